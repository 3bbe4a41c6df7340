"""Real SEV-SNP: reports through Linux configfs-tsm or ``/dev/sev-guest``, sealing keys through the firmware.

Report path, in order of preference:

1. configfs-tsm (Linux >= 6.7): ``mkdir /sys/kernel/config/tsm/report/<entry>``, check ``provider`` is
   ``sev_guest``, write ``privlevel`` and ``inblob``, read ``outblob`` (the report) and ``auxblob`` (the GHCB
   certificate table, often empty), and compare ``generation`` before and after so that a concurrent writer to
   the same entry cannot hand us a report for someone else's REPORT_DATA. The entry is always removed.
2. ``/dev/sev-guest``: ``SNP_GET_EXT_REPORT`` (report + certificate table), else ``SNP_GET_REPORT``.

Sealing keys always use ``SNP_GET_DERIVED_KEY`` on ``/dev/sev-guest`` (configfs-tsm has no key interface): the
firmware derives a key from the chip's VCEK secret mixed with the guest's launch MEASUREMENT and POLICY, so only
this exact image, launched with this policy, on this chip, can derive it again.

ioctl structures (``include/uapi/linux/sev-guest.h``; natural C alignment, little-endian):

* ``snp_guest_request_ioctl`` (32 B): u8 msg_version @0 (must be non-zero), u64 req_data @8, u64 resp_data @16,
  u64 exitinfo2 @24 (low half fw_error, high half vmm_error). req_data/resp_data are *pointers*: passing the
  structures inline is the classic mistake that yields ENOTTY.
* ``snp_report_req`` (96 B): u8 user_data[64], u32 vmpl, u8 rsvd[28].
* ``snp_ext_report_req`` (112 B incl. tail padding): snp_report_req @0, u64 certs_address @96, u32 certs_len @104.
  Linux treats certs_len 0 as "no certificates wanted" (a plain report), requires a page multiple no larger than
  16 KiB otherwise, and on a too-small buffer fails with vmm_error 1 and writes the needed length to certs_len.
* ``snp_report_resp`` (4000 B): u32 status, u32 report_size, 24 reserved, report @0x20.
* ``snp_derived_key_req`` (32 B): u32 root_key_select (0 = VCEK), u32 rsvd, u64 guest_field_select,
  u32 vmpl, u32 guest_svn, u64 tcb_version; ``snp_derived_key_resp`` (64 B): u32 status, 28 reserved, key[32] @0x20.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from confnb.attest.certs import load_certificates
from confnb.attest.errors import CertificateError
from confnb.attest.report import REPORT_SIZE
from kernel_enclave.tee.base import (
    REPORT_DATA_SIZE,
    SEALING_KEY_INFO,
    SEALING_KEY_SIZE,
    TeeBackend,
    TeeError,
    TeeQuote,
    check_context,
    check_report_request,
)
from kernel_enclave.tee.certtable import (
    ARK_GUID,
    ASK_GUID,
    GUID_NAMES,
    VCEK_GUID,
    VLEK_GUID,
    CertTableError,
    der_to_pem,
    parse_cert_table,
)

log = logging.getLogger(__name__)

DEFAULT_CONFIGFS_ROOT = Path("/sys/kernel/config/tsm/report")
DEFAULT_DEVICE = Path("/dev/sev-guest")
SEV_GUEST_PROVIDER = "sev_guest"

SNP_GET_REPORT = 0xC0205300
SNP_GET_DERIVED_KEY = 0xC0205301
SNP_GET_EXT_REPORT = 0xC0205302
_REQUEST_NAMES = {
    SNP_GET_REPORT: "SNP_GET_REPORT",
    SNP_GET_DERIVED_KEY: "SNP_GET_DERIVED_KEY",
    SNP_GET_EXT_REPORT: "SNP_GET_EXT_REPORT",
}
MSG_VERSION = 1
PAGE_SIZE = 4096
SEV_FW_BLOB_MAX_SIZE = 0x4000  # the kernel's upper bound on certs_len (and what its own configfs path uses)
VMM_ERR_INVALID_LEN = 1
VMM_ERR_BUSY = 2
EXITINFO2_UNSET = 0xFF  # Linux's placeholder: the request never reached the hypervisor/firmware
RESPONSE_HEADER_SIZE = 0x20

ROOT_KEY_VCEK = 0
FIELD_GUEST_POLICY = 1 << 0
FIELD_IMAGE_ID = 1 << 1
FIELD_FAMILY_ID = 1 << 2
FIELD_MEASUREMENT = 1 << 3
FIELD_GUEST_SVN = 1 << 4
FIELD_TCB_VERSION = 1 << 5
# Bound to what was launched (MEASUREMENT) and how (POLICY). Deliberately not to TCB_VERSION: a firmware update
# must not make every sealed dataset unreadable.
SEALING_FIELDS = FIELD_GUEST_POLICY | FIELD_MEASUREMENT

_FIRMWARE_STATUS = {0x16: "INVALID_PARAM", 0x27: "INVALID_KEY"}
_MAX_CERT_RETRIES = 3
_BUSY_FIRST_DELAY = 0.05
_BUSY_MAX_DELAY = 1.0
_DEVICE_LOCK = threading.Lock()  # one guest request at a time per process; the firmware serialises anyway


class _ReportReq(ctypes.Structure):
    _fields_ = [("user_data", ctypes.c_uint8 * 64), ("vmpl", ctypes.c_uint32), ("rsvd", ctypes.c_uint8 * 28)]


class _ExtReportReq(ctypes.Structure):
    _fields_ = [("data", _ReportReq), ("certs_address", ctypes.c_uint64), ("certs_len", ctypes.c_uint32)]


class _ReportResp(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint8 * 4000)]


class _DerivedKeyReq(ctypes.Structure):
    _fields_ = [
        ("root_key_select", ctypes.c_uint32),
        ("rsvd", ctypes.c_uint32),
        ("guest_field_select", ctypes.c_uint64),
        ("vmpl", ctypes.c_uint32),
        ("guest_svn", ctypes.c_uint32),
        ("tcb_version", ctypes.c_uint64),
    ]


class _DerivedKeyResp(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint8 * 64)]


class _GuestRequestIoctl(ctypes.Structure):
    _fields_ = [
        ("msg_version", ctypes.c_uint8),
        ("req_data", ctypes.c_uint64),
        ("resp_data", ctypes.c_uint64),
        ("exitinfo2", ctypes.c_uint64),
    ]


assert ctypes.sizeof(_GuestRequestIoctl) == 32
assert ctypes.sizeof(_ReportReq) == 96
assert ctypes.sizeof(_ExtReportReq) == 112
assert _ExtReportReq.certs_len.offset == 104
assert ctypes.sizeof(_ReportResp) == 4000
assert ctypes.sizeof(_DerivedKeyReq) == 32
assert ctypes.sizeof(_DerivedKeyResp) == 64


class IoctlFunction(Protocol):
    """``fcntl.ioctl``'s shape, as far as this module uses it (a mutable buffer, mutated in place)."""

    def __call__(self, fd: int, request: int, arg: Any, /) -> Any: ...


Interface = Literal["auto", "configfs-tsm", "sev-guest"]


class _GuestRequestError(Exception):
    """An ioctl on /dev/sev-guest failed; carries errno and the firmware/VMM error words for the message."""

    def __init__(self, request: int, error: int, exitinfo2: int) -> None:
        super().__init__(request, error, exitinfo2)
        self.request, self.errno, self.exitinfo2 = request, error, exitinfo2

    @property
    def vmm_error(self) -> int:
        return self.exitinfo2 >> 32 if self.exitinfo2 != EXITINFO2_UNSET else 0

    @property
    def busy(self) -> bool:
        """The host is throttling guest requests; waiting helps, another request type does not."""
        return self.errno in (errno.EAGAIN, errno.EBUSY) or self.vmm_error == VMM_ERR_BUSY

    def describe(self, device: Path) -> str:
        name = _REQUEST_NAMES.get(self.request, f"{self.request:#x}")
        code = errno.errorcode.get(self.errno, str(self.errno))
        text = f"{device} {name} failed with {code} ({os.strerror(self.errno)})"
        if self.errno == errno.ENOTTY:
            text += ": the driver rejected the request (old kernel, throttled guest, or malformed ioctl)"
        if self.exitinfo2 == EXITINFO2_UNSET:
            return text + "; the request did not reach the firmware"
        if self.exitinfo2:
            text += f"; firmware error {self.exitinfo2 & 0xFFFF_FFFF:#x}, VMM error {self.exitinfo2 >> 32:#x}"
        return text


class _ConfigfsUnavailableError(Exception):
    """configfs-tsm exists but would not create a report entry (no provider registered, no permission)."""


class SevSnpBackend(TeeBackend):
    """Reports and sealing keys from the SEV-SNP firmware of the VM this process runs in.

    ``interface`` picks the report path: ``"auto"`` (configfs-tsm when its directory exists, else the device),
    ``"configfs-tsm"`` or ``"sev-guest"``. The paths and the ``ioctl``/``mkdir``/``rmdir``/``sleep`` functions
    are injectable so the protocol code can be exercised against an emulated kernel on any machine.
    """

    name = "sev-snp"

    def __init__(
        self,
        *,
        interface: Interface = "auto",
        configfs_root: Path = DEFAULT_CONFIGFS_ROOT,
        device: Path = DEFAULT_DEVICE,
        ioctl: IoctlFunction = fcntl.ioctl,
        mkdir: Callable[[Path], None] = os.mkdir,
        rmdir: Callable[[Path], None] = os.rmdir,
        sleep: Callable[[float], None] = time.sleep,
        busy_timeout: float = 10.0,
        initial_certs_len: int = SEV_FW_BLOB_MAX_SIZE,
        key_vmpl: int = 0,
    ) -> None:
        if interface not in ("auto", "configfs-tsm", "sev-guest"):
            raise ValueError(f"interface must be 'auto', 'configfs-tsm' or 'sev-guest', not {interface!r}")
        if initial_certs_len <= 0 or initial_certs_len % PAGE_SIZE or initial_certs_len > SEV_FW_BLOB_MAX_SIZE:
            raise ValueError(f"initial_certs_len must be a multiple of {PAGE_SIZE} up to {SEV_FW_BLOB_MAX_SIZE}")
        if not 0 <= key_vmpl <= 3:
            raise ValueError("key_vmpl must be 0..3")
        self._interface: Interface = interface
        self._configfs_root = Path(configfs_root)
        self._device = Path(device)
        self._ioctl = ioctl
        self._mkdir = mkdir
        self._rmdir = rmdir
        self._sleep = sleep
        self._busy_timeout = busy_timeout
        self._initial_certs_len = initial_certs_len
        self._key_vmpl = key_vmpl

    # -- TeeBackend -------------------------------------------------------------------------------------

    def get_quote(self, report_data: bytes, vmpl: int = 0) -> TeeQuote:
        check_report_request(report_data, vmpl)
        use_configfs = self._interface == "configfs-tsm" or (self._interface == "auto" and self._configfs_root.is_dir())
        if use_configfs:
            try:
                return self._quote_configfs(report_data, vmpl)
            except _ConfigfsUnavailableError as exc:
                if self._interface == "configfs-tsm" or not self._device.exists():
                    raise TeeError(str(exc)) from None
                log.info("configfs-tsm unavailable (%s); using %s", exc, self._device)
        return self._quote_device(report_data, vmpl)

    def derive_sealing_key(self, context: bytes) -> bytes:
        """SNP_GET_DERIVED_KEY (VCEK root, MEASUREMENT + POLICY mixed in), then HKDF-SHA256 with ``context``."""
        check_context(context)
        request = _DerivedKeyReq(
            root_key_select=ROOT_KEY_VCEK,
            rsvd=0,
            guest_field_select=SEALING_FIELDS,
            vmpl=self._key_vmpl,
            guest_svn=0,
            tcb_version=0,
        )
        response = _DerivedKeyResp()
        try:
            with _DEVICE_LOCK, self._open_device() as fd:
                self._guest_request(fd, SNP_GET_DERIVED_KEY, request, response)
            raw = memoryview(response).cast("B")
            status = int.from_bytes(raw[0:4], "little")
            if status:
                raise TeeError(f"SEV-SNP firmware refused MSG_KEY_REQ: status {status:#x} ({_status_name(status)})")
            firmware_key = bytes(raw[RESPONSE_HEADER_SIZE : RESPONSE_HEADER_SIZE + 32])
        except _GuestRequestError as exc:
            raise TeeError(exc.describe(self._device)) from None
        finally:
            ctypes.memset(ctypes.addressof(response), 0, ctypes.sizeof(response))
        hkdf = HKDF(algorithm=hashes.SHA256(), length=SEALING_KEY_SIZE, salt=None, info=SEALING_KEY_INFO + context)
        return hkdf.derive(firmware_key)

    # -- configfs-tsm -----------------------------------------------------------------------------------

    def _quote_configfs(self, report_data: bytes, vmpl: int) -> TeeQuote:
        entry = self._configfs_root / f"confnb-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            self._mkdir(entry)
        except OSError as exc:
            raise _ConfigfsUnavailableError(f"cannot create configfs-tsm entry {entry}: {exc.strerror}") from None
        try:
            provider = _read_attribute(entry, "provider").decode("utf-8", "replace")
            if provider != SEV_GUEST_PROVIDER + "\n":
                raise TeeError(f"configfs-tsm provider is {provider.strip()!r}, not {SEV_GUEST_PROVIDER}")
            floor = _read_optional_int(entry, "privlevel_floor")
            if floor is not None and vmpl < floor:
                raise TeeError(f"VMPL {vmpl} is below this guest's configfs-tsm privlevel_floor {floor}")
            _write_attribute(entry, "privlevel", str(vmpl).encode("ascii"))
            _write_attribute(entry, "inblob", report_data)
            before = _read_generation(entry)
            outblob = _read_attribute(entry, "outblob")
            auxblob = _read_attribute(entry, "auxblob", missing_ok=True)
            after = _read_generation(entry)
            if after != before:
                raise TeeError(
                    f"configfs-tsm entry was written by someone else while it was read (generation {before} -> "
                    f"{after}); retry"
                )
        finally:
            try:
                self._rmdir(entry)
            except OSError as exc:
                log.warning("could not remove configfs-tsm entry %s: %s", entry, exc.strerror)
        if len(outblob) != REPORT_SIZE:
            raise TeeError(f"configfs-tsm outblob is {len(outblob)} bytes, not a {REPORT_SIZE}-byte SNP report")
        return _quote(outblob, auxblob, "configfs-tsm auxblob")

    # -- /dev/sev-guest ---------------------------------------------------------------------------------

    def _quote_device(self, report_data: bytes, vmpl: int) -> TeeQuote:
        with _DEVICE_LOCK, self._open_device() as fd:
            try:
                report, table = self._extended_report(fd, report_data, vmpl)
            except _GuestRequestError as exc:
                if exc.busy:
                    raise TeeError(exc.describe(self._device)) from None
                log.info("%s; falling back to SNP_GET_REPORT", exc.describe(self._device))
                try:
                    report, table = self._plain_report(fd, report_data, vmpl), b""
                except _GuestRequestError as plain_exc:
                    raise TeeError(plain_exc.describe(self._device)) from None
        return _quote(report, table, "SNP_GET_EXT_REPORT certificate table")

    def _extended_report(self, fd: int, report_data: bytes, vmpl: int) -> tuple[bytes, bytes]:
        certs_len = self._initial_certs_len
        for _ in range(_MAX_CERT_RETRIES):
            request = _ExtReportReq()
            _fill_report_request(request.data, report_data, vmpl)
            certs = (ctypes.c_uint8 * certs_len)()
            request.certs_address = ctypes.addressof(certs)
            request.certs_len = certs_len
            response = _ReportResp()
            try:
                self._guest_request(fd, SNP_GET_EXT_REPORT, request, response)
            except _GuestRequestError as exc:
                if exc.vmm_error != VMM_ERR_INVALID_LEN:
                    raise
                needed = int(request.certs_len)
                if needed <= certs_len:
                    raise TeeError(
                        f"{self._device} reported a too-small certificate buffer but asked for {needed} bytes"
                    ) from None
                log.debug("host needs a %d-byte certificate buffer; retrying", needed)
                certs_len = -(-needed // PAGE_SIZE) * PAGE_SIZE
                continue
            return _report_from_response(response, "SNP_GET_EXT_REPORT"), bytes(certs)
        raise TeeError(f"{self._device} kept asking for a larger certificate buffer ({certs_len} bytes)")

    def _plain_report(self, fd: int, report_data: bytes, vmpl: int) -> bytes:
        request = _ReportReq()
        _fill_report_request(request, report_data, vmpl)
        response = _ReportResp()
        self._guest_request(fd, SNP_GET_REPORT, request, response)
        return _report_from_response(response, "SNP_GET_REPORT")

    @contextlib.contextmanager
    def _open_device(self) -> Iterator[int]:
        try:
            fd = os.open(self._device, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TeeError(
                f"{self._device} does not exist: not an SEV-SNP guest, or the sev-guest driver is not loaded"
            ) from None
        except OSError as exc:
            raise TeeError(f"cannot open {self._device}: {exc.strerror}") from None
        try:
            yield fd
        finally:
            os.close(fd)

    def _guest_request(self, fd: int, request: int, req: ctypes.Structure, resp: ctypes.Structure) -> None:
        """One ioctl, with pointers to ``req``/``resp``; retries briefly while the host throttles us."""
        waited, delay = 0.0, _BUSY_FIRST_DELAY
        while True:
            arg = _GuestRequestIoctl(
                msg_version=MSG_VERSION,
                req_data=ctypes.addressof(req),
                resp_data=ctypes.addressof(resp),
                exitinfo2=0,
            )
            try:
                self._ioctl(fd, request, arg)
                return
            except OSError as exc:
                failure = _GuestRequestError(request, exc.errno or 0, int(arg.exitinfo2))
            if not failure.busy or waited >= self._busy_timeout:
                raise failure
            log.debug("%s busy; retrying in %.2f s", self._device, delay)
            self._sleep(delay)
            waited += delay
            delay = min(delay * 2, _BUSY_MAX_DELAY)


def configfs_provider(
    root: Path = DEFAULT_CONFIGFS_ROOT,
    mkdir: Callable[[Path], None] = os.mkdir,
    rmdir: Callable[[Path], None] = os.rmdir,
) -> str | None:
    """The configfs-tsm provider name (``sev_guest``, ``tdx_guest``, ...), or None if there is none to ask."""
    if not Path(root).is_dir():
        return None
    entry = Path(root) / f"confnb-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        mkdir(entry)
    except OSError:
        return None
    try:
        return _read_attribute(entry, "provider").decode("utf-8", "replace").strip()
    except TeeError:
        return None
    finally:
        with contextlib.suppress(OSError):
            rmdir(entry)


# -- helpers ----------------------------------------------------------------------------------------------


def _fill_report_request(request: _ReportReq, report_data: bytes, vmpl: int) -> None:
    assert len(report_data) == REPORT_DATA_SIZE
    ctypes.memmove(ctypes.addressof(request.user_data), report_data, REPORT_DATA_SIZE)
    request.vmpl = vmpl


def _report_from_response(response: _ReportResp, what: str) -> bytes:
    raw = bytes(response)
    status, size = struct.unpack_from("<II", raw, 0)
    if status:
        raise TeeError(f"SEV-SNP firmware refused {what}: status {status:#x} ({_status_name(status)})")
    if size != REPORT_SIZE:
        raise TeeError(f"SEV-SNP firmware returned a {size}-byte report from {what}, expected {REPORT_SIZE}")
    return raw[RESPONSE_HEADER_SIZE : RESPONSE_HEADER_SIZE + REPORT_SIZE]


def _status_name(status: int) -> str:
    return _FIRMWARE_STATUS.get(status, "unknown status")


def _quote(report: bytes, table_bytes: bytes, source: str) -> TeeQuote:
    """Attach the certificates the host supplied; a damaged table costs the certificates, never the report."""
    try:
        table = parse_cert_table(table_bytes)
    except CertTableError as exc:
        log.warning("ignoring the %s: %s", source, exc)
        table = {}
    signing_key = int.from_bytes(report[0x48:0x4C], "little") >> 2 & 0b111
    vek_guid = VLEK_GUID if signing_key == 1 else VCEK_GUID
    vek = _pem_if_certificate(table, vek_guid, source)
    chain = tuple(pem for guid in (ASK_GUID, ARK_GUID) if (pem := _pem_if_certificate(table, guid, source)))
    return TeeQuote(report=report, vek_pem=vek, chain_pem=chain)


def _pem_if_certificate(table: dict[str, bytes], guid: str, source: str) -> str | None:
    der = table.get(guid)
    if not der:
        return None
    try:
        load_certificates(der, what=GUID_NAMES[guid])
    except CertificateError as exc:
        log.warning("ignoring the %s entry of the %s: %s", GUID_NAMES[guid], source, exc)
        return None
    return der_to_pem(der)


def _read_attribute(entry: Path, name: str, *, missing_ok: bool = False) -> bytes:
    try:
        with open(entry / name, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        if missing_ok:
            return b""
        raise TeeError(f"configfs-tsm entry has no {name!r} attribute (kernel too old?)") from None
    except OSError as exc:
        raise TeeError(f"configfs-tsm {name}: {exc.strerror or exc}") from None


def _write_attribute(entry: Path, name: str, value: bytes) -> None:
    try:
        fd = os.open(entry / name, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TeeError(f"configfs-tsm entry has no {name!r} attribute (kernel too old?)") from None
    except OSError as exc:
        raise TeeError(f"configfs-tsm {name}: {exc.strerror or exc}") from None
    try:
        try:
            view = memoryview(value)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)  # configfs commits binary attributes on close, so its errors count too
    except OSError as exc:
        raise TeeError(f"configfs-tsm rejected {name}: {exc.strerror or exc}") from None


def _read_generation(entry: Path) -> int:
    text = _read_attribute(entry, "generation").strip()
    try:
        return int(text)
    except ValueError:
        raise TeeError(f"configfs-tsm generation is not a number: {text[:20]!r}") from None


def _read_optional_int(entry: Path, name: str) -> int | None:
    if not (entry / name).exists():
        return None
    text = _read_attribute(entry, name).strip()
    try:
        return int(text)
    except ValueError:
        raise TeeError(f"configfs-tsm {name} is not a number: {text[:20]!r}") from None
