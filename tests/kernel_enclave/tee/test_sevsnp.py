"""The sev-snp backend's Linux protocols, against an emulated kernel whose "firmware" is the simulated chip.

No mocking of the code under test: the backend does its real file I/O on a temporary directory laid out like
configfs-tsm, and its real ioctl marshalling against a fake ``ioctl`` that sees exactly what the kernel would —
a 32-byte ``snp_guest_request_ioctl`` whose pointers it follows with ctypes to decode the request and write the
response. The struct layouts here are written out independently of the backend's ctypes definitions, so a layout
mistake in the backend fails these tests instead of being mirrored by them.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import hmac
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from confnb.attest.report import AttestationReport
from kernel_enclave.tee import TeeError, get_backend, sevsnp
from kernel_enclave.tee.certtable import ARK_GUID, ASK_GUID, VCEK_GUID, build_cert_table
from kernel_enclave.tee.sevsnp import SevSnpBackend
from kernel_enclave.tee.simulated import SimulatedBackend

REPORT_DATA = hashlib.sha512(b"claims").digest()
REPORT_SIZE = 0x4A0
PAGE = 4096

# include/uapi/linux/sev-guest.h: _IOWR('S', n, struct snp_guest_request_ioctl)
IOC_READ_WRITE = 3
GUEST_REQUEST_SIZE = 32


def _iowr(number: int) -> int:
    return IOC_READ_WRITE << 30 | GUEST_REQUEST_SIZE << 16 | ord("S") << 8 | number


GET_REPORT, GET_DERIVED_KEY, GET_EXT_REPORT = _iowr(0), _iowr(1), _iowr(2)


def _der(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


def _chain_table(firmware: SimulatedBackend) -> bytes:
    return build_cert_table(
        {VCEK_GUID: _der(firmware.vcek_pem), ASK_GUID: _der(firmware.ask_pem), ARK_GUID: _der(firmware.ark_pem)}
    )


# -- an emulated configfs-tsm ------------------------------------------------------------------------------------


class FakeTsm:
    """The kernel's side of configfs-tsm over a plain directory.

    ``mkdir``/``rmdir`` do what configfs does on those syscalls: create the entry with its attribute files, and
    remove the entry with them. ``outblob`` and ``auxblob`` are FIFOs answered by a "firmware" thread when the
    guest reads them, which is when the real kernel generates the report — from the ``inblob`` and ``privlevel``
    the guest wrote, signed by the simulated chip.
    """

    def __init__(
        self,
        root: Path,
        firmware: SimulatedBackend,
        *,
        provider: str = "sev_guest",
        auxblob: bytes = b"",
        privlevel_floor: int = 0,
        concurrent_writer: bool = False,
    ) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.firmware = firmware
        self.provider = provider
        self.auxblob = auxblob
        self.privlevel_floor = privlevel_floor
        self.concurrent_writer = concurrent_writer
        self.requests: list[tuple[bytes, int]] = []
        self.created: list[Path] = []
        self.removed: list[Path] = []
        self._workers: dict[Path, tuple[threading.Thread, threading.Event]] = {}

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)
        (path / "provider").write_text(self.provider + "\n")
        (path / "privlevel_floor").write_text(f"{self.privlevel_floor}\n")
        (path / "generation").write_text("0\n")
        (path / "privlevel").write_bytes(b"")
        (path / "inblob").write_bytes(b"")
        os.mkfifo(path / "outblob")
        os.mkfifo(path / "auxblob")
        stop = threading.Event()
        worker = threading.Thread(target=self._firmware, args=(path, stop), daemon=True)
        self._workers[path] = (worker, stop)
        self.created.append(path)
        worker.start()

    def rmdir(self, path: Path) -> None:
        worker, stop = self._workers.pop(path)
        stop.set()
        worker.join(timeout=10)
        for child in path.iterdir():
            child.unlink()
        os.rmdir(path)
        self.removed.append(path)

    def _writer(self, fifo: Path, stop: threading.Event) -> int | None:
        """Open a FIFO for writing once the guest opens it for reading (a read of the attribute)."""
        while not stop.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
                time.sleep(0.001)
                continue
            os.set_blocking(fd, True)
            return fd
        return None

    def _firmware(self, entry: Path, stop: threading.Event) -> None:
        fd = self._writer(entry / "outblob", stop)
        if fd is None:
            return
        with os.fdopen(fd, "wb") as out:
            inblob = (entry / "inblob").read_bytes()
            privlevel = int((entry / "privlevel").read_text())
            self.requests.append((inblob, privlevel))
            out.write(self.firmware.get_quote(inblob, privlevel).report)
        if self.concurrent_writer:  # someone else wrote an attribute of this entry meanwhile
            (entry / "generation").write_text("1\n")
        fd = self._writer(entry / "auxblob", stop)
        if fd is None:
            return
        with os.fdopen(fd, "wb") as aux:
            aux.write(self.auxblob)


@pytest.fixture
def tsm(tmp_path: Path, simulated_backend: SimulatedBackend) -> Callable[..., FakeTsm]:
    def make(**options: Any) -> FakeTsm:
        return FakeTsm(tmp_path / "tsm" / "report", simulated_backend, **options)

    return make


def _configfs_backend(fake: FakeTsm, **options: Any) -> SevSnpBackend:
    return SevSnpBackend(
        interface="configfs-tsm", configfs_root=fake.root, mkdir=fake.mkdir, rmdir=fake.rmdir, **options
    )


def test_configfs_report_data_reaches_the_signed_report(
    tsm: Callable[..., FakeTsm],
    simulated_backend: SimulatedBackend,
    signature_valid: Callable[[bytes, str], bool],
) -> None:
    fake = tsm(auxblob=_chain_table(simulated_backend))
    quote = _configfs_backend(fake).get_quote(REPORT_DATA, vmpl=1)

    assert fake.requests == [(REPORT_DATA, 1)]
    report = AttestationReport.parse(quote.report)
    assert report.report_data == REPORT_DATA
    assert report.vmpl == 1
    assert quote.vek_pem is not None
    assert _der(quote.vek_pem) == _der(simulated_backend.vcek_pem)
    assert [_der(pem) for pem in quote.chain_pem] == [_der(simulated_backend.ask_pem), _der(simulated_backend.ark_pem)]
    assert signature_valid(quote.report, quote.vek_pem)
    assert fake.removed == fake.created
    assert list(fake.root.iterdir()) == []


def test_configfs_empty_auxblob_means_no_certificates(tsm: Callable[..., FakeTsm]) -> None:
    fake = tsm(auxblob=b"")
    quote = _configfs_backend(fake).get_quote(REPORT_DATA)
    assert quote.report[0x50:0x90] == REPORT_DATA
    assert quote.vek_pem is None
    assert quote.chain_pem == ()


def test_configfs_damaged_auxblob_costs_the_certificates_not_the_report(
    tsm: Callable[..., FakeTsm], caplog: pytest.LogCaptureFixture
) -> None:
    fake = tsm(auxblob=b"\x01" * 30)
    with caplog.at_level(logging.WARNING, logger="kernel_enclave.tee.sevsnp"):
        quote = _configfs_backend(fake).get_quote(REPORT_DATA)
    assert quote.report[0x50:0x90] == REPORT_DATA
    assert quote.vek_pem is None
    assert "ignoring the configfs-tsm auxblob" in caplog.text


def test_configfs_certificate_that_does_not_parse_is_dropped(
    tsm: Callable[..., FakeTsm], simulated_backend: SimulatedBackend
) -> None:
    table = build_cert_table({VCEK_GUID: b"\x30\x03junk", ARK_GUID: _der(simulated_backend.ark_pem)})
    quote = _configfs_backend(tsm(auxblob=table)).get_quote(REPORT_DATA)
    assert quote.vek_pem is None
    assert len(quote.chain_pem) == 1  # only the ARK was supplied; it is passed on alone


def test_configfs_wrong_provider(tsm: Callable[..., FakeTsm]) -> None:
    fake = tsm(provider="tdx_guest")
    with pytest.raises(TeeError, match=r"^configfs-tsm provider is 'tdx_guest', not sev_guest$"):
        _configfs_backend(fake).get_quote(REPORT_DATA)
    assert fake.requests == []
    assert fake.removed == fake.created


def test_configfs_concurrent_writer_is_detected(tsm: Callable[..., FakeTsm]) -> None:
    fake = tsm(concurrent_writer=True)
    with pytest.raises(TeeError, match=r"generation 0 -> 1\); retry"):
        _configfs_backend(fake).get_quote(REPORT_DATA)
    assert fake.removed == fake.created


def test_configfs_vmpl_below_the_floor(tsm: Callable[..., FakeTsm]) -> None:
    fake = tsm(privlevel_floor=2)
    with pytest.raises(TeeError, match="VMPL 1 is below this guest's configfs-tsm privlevel_floor 2"):
        _configfs_backend(fake).get_quote(REPORT_DATA, vmpl=1)
    assert fake.removed == fake.created


def test_configfs_that_refuses_entries_falls_back_to_the_device(
    tmp_path: Path, simulated_backend: SimulatedBackend
) -> None:
    root = tmp_path / "report"
    root.mkdir()

    def no_provider(path: Path) -> None:
        raise OSError(errno.ENXIO, os.strerror(errno.ENXIO), str(path))

    device = FakeSevGuest(simulated_backend)
    backend = SevSnpBackend(configfs_root=root, mkdir=no_provider, device=device.path(tmp_path), ioctl=device)
    assert backend.get_quote(REPORT_DATA).report[0x50:0x90] == REPORT_DATA
    assert [name for name, _ in device.calls] == ["EXT_REPORT"]

    only_configfs = SevSnpBackend(interface="configfs-tsm", configfs_root=root, mkdir=no_provider)
    with pytest.raises(TeeError, match=r"cannot create configfs-tsm entry .*: No such device or address"):
        only_configfs.get_quote(REPORT_DATA)


# -- an emulated /dev/sev-guest ------------------------------------------------------------------------------------


class FakeSevGuest:
    """The sev-guest driver plus firmware behind ``ioctl(fd, request, struct snp_guest_request_ioctl *)``."""

    def __init__(
        self,
        firmware: SimulatedBackend,
        *,
        table: bytes = b"",
        status: int = 0,
        busy: int = 0,
        ext_unsupported: bool = False,
        key_measurement: bytes = b"\x11" * 48,
        key_policy: int = 0x30000,
    ) -> None:
        self.firmware = firmware
        self.table = table
        self.status = status
        self.busy = busy
        self.ext_unsupported = ext_unsupported
        self.key_measurement = key_measurement
        self.key_policy = key_policy
        self.chip_secret = b"\x5a" * 32
        self.calls: list[tuple[str, dict[str, int]]] = []

    def path(self, tmp_path: Path) -> Path:
        device = tmp_path / "sev-guest"
        device.touch()
        return device

    def __call__(self, fd: int, request: int, arg: Any) -> int:
        raw = bytes(arg)
        assert len(raw) == 32, "snp_guest_request_ioctl is 32 bytes"
        msg_version, req_data, resp_data, _ = struct.unpack("<B7xQQQ", raw)
        exitinfo2 = memoryview(arg).cast("B")

        def fail(error: int, exit_info: int) -> None:
            exitinfo2[24:32] = exit_info.to_bytes(8, "little")  # the kernel copies the struct back on failure
            raise OSError(error, os.strerror(error))

        if msg_version != 1 or not req_data or not resp_data:
            fail(errno.EINVAL, 0xFF)
        if self.busy:
            self.busy -= 1
            fail(errno.EAGAIN, 2 << 32)
        if request == GET_REPORT:
            self.calls.append(("REPORT", {}))
            self._report(ctypes.string_at(req_data, 96), resp_data)
        elif request == GET_EXT_REPORT:
            if self.ext_unsupported:
                fail(errno.ENOTTY, 0xFF)
            req = ctypes.string_at(req_data, 112)  # sizeof(struct snp_ext_report_req), tail padding included
            certs_address, certs_len = struct.unpack_from("<QI", req, 96)
            self.calls.append(("EXT_REPORT", {"certs_len": certs_len, "certs_address": certs_address}))
            if certs_len and certs_address:
                if certs_len % PAGE or certs_len > 0x4000:
                    fail(errno.EINVAL, 0xFF)
                needed = -(-len(self.table) // PAGE) * PAGE
                if certs_len < needed:
                    ctypes.memmove(req_data + 104, needed.to_bytes(4, "little"), 4)
                    fail(errno.EIO, 1 << 32)  # SNP_GUEST_VMM_ERR_INVALID_LEN
                ctypes.memmove(certs_address, self.table.ljust(certs_len, b"\0"), certs_len)
            self._report(req[:96], resp_data)
        elif request == GET_DERIVED_KEY:
            self._derived_key(ctypes.string_at(req_data, 32), resp_data)
        else:
            fail(errno.ENOTTY, 0xFF)
        return 0

    def _report(self, req: bytes, resp_data: int) -> None:
        user_data, vmpl, reserved = struct.unpack("<64sI28s", req)
        status = self.status or (0x16 if any(reserved) else 0)
        report = b"" if status else self.firmware.get_quote(user_data, vmpl).report
        response = struct.pack("<II24x", status, len(report)) + report
        ctypes.memmove(resp_data, response.ljust(4000, b"\0"), 4000)

    def _derived_key(self, req: bytes, resp_data: int) -> None:
        root_key, reserved, fields, vmpl, guest_svn, tcb = struct.unpack("<IIQIIQ", req)
        self.calls.append(
            (
                "DERIVED_KEY",
                {
                    "root_key_select": root_key,
                    "guest_field_select": fields,
                    "vmpl": vmpl,
                    "guest_svn": guest_svn,
                    "tcb_version": tcb,
                    "rsvd": reserved,
                },
            )
        )
        mix = struct.pack("<IQII", root_key, fields, vmpl, guest_svn)
        if fields & 1 << 0:
            mix += self.key_policy.to_bytes(8, "little")
        if fields & 1 << 3:
            mix += self.key_measurement
        key = hmac.new(self.chip_secret, mix, hashlib.sha256).digest()
        response = struct.pack("<I28x", self.status) + (bytes(32) if self.status else key)
        ctypes.memmove(resp_data, response, 64)


def _device_backend(fake: FakeSevGuest, tmp_path: Path, **options: Any) -> SevSnpBackend:
    return SevSnpBackend(interface="sev-guest", device=fake.path(tmp_path), ioctl=fake, **options)


def test_ioctl_numbers_are_linux_iowr() -> None:
    assert (sevsnp.SNP_GET_REPORT, sevsnp.SNP_GET_DERIVED_KEY, sevsnp.SNP_GET_EXT_REPORT) == (
        GET_REPORT,
        GET_DERIVED_KEY,
        GET_EXT_REPORT,
    )
    assert (GET_REPORT, GET_DERIVED_KEY, GET_EXT_REPORT) == (0xC0205300, 0xC0205301, 0xC0205302)


def test_extended_report_grows_the_certificate_buffer_when_asked(
    tmp_path: Path, simulated_backend: SimulatedBackend, signature_valid: Callable[[bytes, str], bool]
) -> None:
    table = _chain_table(simulated_backend)
    assert len(table) > PAGE  # three certificates need two pages
    fake = FakeSevGuest(simulated_backend, table=table)
    quote = _device_backend(fake, tmp_path, initial_certs_len=PAGE).get_quote(REPORT_DATA, vmpl=3)

    assert [call["certs_len"] for _, call in fake.calls] == [PAGE, 2 * PAGE]
    assert all(call["certs_address"] for _, call in fake.calls)
    report = AttestationReport.parse(quote.report)
    assert (report.report_data, report.vmpl) == (REPORT_DATA, 3)
    assert quote.vek_pem is not None
    assert signature_valid(quote.report, quote.vek_pem)
    assert [_der(pem) for pem in quote.chain_pem] == [_der(simulated_backend.ask_pem), _der(simulated_backend.ark_pem)]


def test_extended_report_default_buffer_fits_amds_chain(tmp_path: Path, simulated_backend: SimulatedBackend) -> None:
    fake = FakeSevGuest(simulated_backend, table=_chain_table(simulated_backend))
    quote = _device_backend(fake, tmp_path).get_quote(REPORT_DATA)
    assert [name for name, _ in fake.calls] == ["EXT_REPORT"]
    assert quote.vek_pem is not None


def test_extended_report_without_host_certificates(tmp_path: Path, simulated_backend: SimulatedBackend) -> None:
    quote = _device_backend(FakeSevGuest(simulated_backend, table=b""), tmp_path).get_quote(REPORT_DATA)
    assert quote.report[0x50:0x90] == REPORT_DATA
    assert (quote.vek_pem, quote.chain_pem) == (None, ())


def test_plain_report_when_extended_reports_are_unavailable(
    tmp_path: Path, simulated_backend: SimulatedBackend
) -> None:
    fake = FakeSevGuest(simulated_backend, ext_unsupported=True)
    quote = _device_backend(fake, tmp_path).get_quote(REPORT_DATA, vmpl=2)
    assert [name for name, _ in fake.calls] == ["REPORT"]
    report = AttestationReport.parse(quote.report)
    assert (report.report_data, report.vmpl) == (REPORT_DATA, 2)
    assert quote.vek_pem is None


def test_firmware_error_status_is_reported(tmp_path: Path, simulated_backend: SimulatedBackend) -> None:
    backend = _device_backend(FakeSevGuest(simulated_backend, status=0x16), tmp_path)
    with pytest.raises(TeeError, match=r"^SEV-SNP firmware refused SNP_GET_EXT_REPORT: status 0x16 \(INVALID_PARAM\)$"):
        backend.get_quote(REPORT_DATA)


def test_throttling_is_waited_out(tmp_path: Path, simulated_backend: SimulatedBackend) -> None:
    slept: list[float] = []
    fake = FakeSevGuest(simulated_backend, busy=3)
    quote = _device_backend(fake, tmp_path, sleep=slept.append).get_quote(REPORT_DATA)
    assert quote.report[0x50:0x90] == REPORT_DATA
    assert slept == [0.05, 0.1, 0.2]


def test_endless_throttling_gives_up(tmp_path: Path, simulated_backend: SimulatedBackend) -> None:
    slept: list[float] = []
    fake = FakeSevGuest(simulated_backend, busy=10**6)
    backend = _device_backend(fake, tmp_path, sleep=slept.append, busy_timeout=3.0)
    with pytest.raises(TeeError, match=r"SNP_GET_EXT_REPORT failed with EAGAIN .*VMM error 0x2$"):
        backend.get_quote(REPORT_DATA)
    assert 3.0 <= sum(slept) < 4.0
    assert {name for name, _ in fake.calls} <= {"EXT_REPORT"}  # throttling is not a reason to downgrade


def test_a_rejected_ioctl_is_named(tmp_path: Path) -> None:
    device = tmp_path / "sev-guest"
    device.touch()

    def unknown_request(fd: int, request: int, arg: Any) -> int:
        # What the driver does with a request it does not know: exitinfo2 = 0xff, copied back, -ENOTTY.
        memoryview(arg).cast("B")[24:32] = (0xFF).to_bytes(8, "little")
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    backend = SevSnpBackend(interface="sev-guest", device=device, ioctl=unknown_request)
    with pytest.raises(TeeError, match=r"SNP_GET_REPORT failed with ENOTTY .*did not reach the firmware$"):
        backend.get_quote(REPORT_DATA)


def test_missing_device(tmp_path: Path) -> None:
    backend = SevSnpBackend(interface="sev-guest", device=tmp_path / "sev-guest")
    with pytest.raises(TeeError, match="sev-guest does not exist: not an SEV-SNP guest"):
        backend.get_quote(REPORT_DATA)
    with pytest.raises(TeeError, match="does not exist"):
        backend.derive_sealing_key(b"vault")


# -- sealing keys ---------------------------------------------------------------------------------------------------


def test_sealing_key_is_bound_to_measurement_and_policy(tmp_path: Path, simulated_backend: SimulatedBackend) -> None:
    fake = FakeSevGuest(simulated_backend)
    backend = _device_backend(fake, tmp_path)
    key = backend.derive_sealing_key(b"vault")

    assert len(key) == 32
    assert fake.calls == [
        (
            "DERIVED_KEY",
            {
                "root_key_select": 0,
                "guest_field_select": 0b1001,
                "vmpl": 0,
                "guest_svn": 0,
                "tcb_version": 0,
                "rsvd": 0,
            },
        )
    ]
    assert backend.derive_sealing_key(b"vault") == key
    assert backend.derive_sealing_key(b"audit") != key
    fake.key_measurement = b"\x22" * 48  # another image, same chip
    assert backend.derive_sealing_key(b"vault") != key
    fake.key_measurement = b"\x11" * 48
    fake.key_policy = 0xB0000  # same image launched with DEBUG allowed
    assert backend.derive_sealing_key(b"vault") != key


def test_sealing_key_firmware_error(tmp_path: Path, simulated_backend: SimulatedBackend) -> None:
    backend = _device_backend(FakeSevGuest(simulated_backend, status=0x27), tmp_path)
    with pytest.raises(TeeError, match=r"^SEV-SNP firmware refused MSG_KEY_REQ: status 0x27 \(INVALID_KEY\)$"):
        backend.derive_sealing_key(b"vault")


# -- choosing an interface --------------------------------------------------------------------------------------------


def test_auto_without_any_interface(tmp_path: Path) -> None:
    with pytest.raises(TeeError, match=r"^no SEV-SNP guest interface found; use the simulated TEE with --simulated$"):
        get_backend("auto", configfs_root=tmp_path / "none", device=tmp_path / "sev-guest")


def test_auto_prefers_configfs_with_sev_guest(tsm: Callable[..., FakeTsm], tmp_path: Path) -> None:
    fake = tsm()
    backend = get_backend(
        "auto", configfs_root=fake.root, mkdir=fake.mkdir, rmdir=fake.rmdir, device=tmp_path / "sev-guest"
    )
    assert isinstance(backend, SevSnpBackend)
    assert backend.name == "sev-snp"
    assert len(fake.created) == 1  # the provider probe
    assert backend.get_quote(REPORT_DATA).report[0x50:0x90] == REPORT_DATA
    assert fake.requests == [(REPORT_DATA, 0)]
    assert list(fake.root.iterdir()) == []


def test_auto_with_another_tee_provider(tsm: Callable[..., FakeTsm], tmp_path: Path) -> None:
    fake = tsm(provider="tdx_guest")
    with pytest.raises(TeeError, match="configfs-tsm provider is 'tdx_guest', not sev_guest"):
        get_backend("auto", configfs_root=fake.root, mkdir=fake.mkdir, rmdir=fake.rmdir, device=tmp_path / "sev-guest")


def test_auto_uses_the_device_when_there_is_no_configfs(tmp_path: Path, simulated_backend: SimulatedBackend) -> None:
    fake = FakeSevGuest(simulated_backend)
    backend = get_backend("auto", configfs_root=tmp_path / "none", device=fake.path(tmp_path), ioctl=fake)
    assert backend.get_quote(REPORT_DATA).report[0x50:0x90] == REPORT_DATA
    assert [name for name, _ in fake.calls] == ["EXT_REPORT"]


def test_unknown_backend_name() -> None:
    with pytest.raises(TeeError, match="unknown TEE backend 'sgx'"):
        get_backend("sgx")


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="interface"):
        SevSnpBackend(interface="tdx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="initial_certs_len"):
        SevSnpBackend(initial_certs_len=1000)
