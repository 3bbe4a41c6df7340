/**
 * The SEV-SNP ATTESTATION_REPORT (AMD SEV-SNP firmware ABI, "Table 23"): 1184 bytes, little-endian.
 *
 * Mirrors `confnb.attest.report` so the browser shows the same values the server does. Parsing never judges
 * the content (the checks do); only input that cannot be a report (wrong length, unknown version) is rejected.
 */

import { toHex } from './bytes';

export const REPORT_SIZE = 0x4a0;
/** The firmware signs bytes 0x000..0x29F. */
export const SIGNED_SIZE = 0x2a0;
export const SUPPORTED_VERSIONS: readonly number[] = [2, 3, 4, 5];
/** r and s are 72-byte little-endian slots of which P-384 uses the low 48 bytes. */
export const SIGNATURE_SLOT = 72;
export const P384_COMPONENT = 48;

export type Product = 'Milan' | 'Genoa' | 'Turin';

/** A TCB_VERSION decoded with the product's layout (Turin moved the SPLs to make room for FMC in byte 0). */
export type TcbVersion = {
  bootloader: number;
  tee: number;
  snp: number;
  microcode: number;
  /** Turin only. */
  fmc?: number;
  /** The 8 bytes as the firmware wrote them, hex. */
  raw: string;
};

/** POLICY (u64 at 0x008): what the guest owner allowed at launch. */
export type GuestPolicyBits = {
  raw: string;
  abi: string;
  smt: boolean;
  migrate_ma: boolean;
  debug: boolean;
  single_socket: boolean;
  cxl_allowed: boolean;
  mem_aes_256_xts: boolean;
  rapl_disabled: boolean;
  ciphertext_hiding: boolean;
  page_swap_disabled: boolean;
};

export type SigningKeyName = 'VCEK' | 'VLEK' | 'NONE' | `reserved(${number})`;

/** Every field of a report, decoded. Byte strings are lower-case hex; u64 words are `0x…` hex strings. */
export type DecodedReport = {
  version: number;
  /** From CPUID_FAM_ID / CPUID_MOD_ID (v3+); null for v2 reports and parts without a pinned root. */
  product: Product | null;
  guestSvn: number;
  policy: GuestPolicyBits;
  familyId: string;
  imageId: string;
  vmpl: number;
  signatureAlgo: number;
  currentTcb: TcbVersion;
  platformInfo: string;
  keyInfo: string;
  signingKey: SigningKeyName;
  maskChipKey: boolean;
  reportData: string;
  measurement: string;
  hostData: string;
  idKeyDigest: string;
  authorKeyDigest: string;
  reportId: string;
  reportIdMa: string;
  reportedTcb: TcbVersion;
  cpuid: { family: number; model: number; stepping: number } | null;
  chipId: string;
  committedTcb: TcbVersion;
  currentFirmware: string;
  committedFirmware: string;
  launchTcb: TcbVersion;
  launchMitVector: string | null;
  currentMitVector: string | null;
  signature: { r: string; s: string };
};

/** Input that is not an ATTESTATION_REPORT at all. */
export class ReportFormatError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ReportFormatError';
  }
}

/** virtee/sev `Generation::identify_cpu`, restricted to the products AMD publishes a root for. */
export function productFromCpuid(
  family: number,
  model: number
): Product | null {
  if (family === 0x19) {
    if (model <= 0x0f) {
      return 'Milan';
    }
    if ((model >= 0x10 && model <= 0x1f) || (model >= 0xa0 && model <= 0xaf)) {
      return 'Genoa';
    }
  }
  if (family === 0x1a && model <= 0x11) {
    return 'Turin';
  }
  return null;
}

export function decodeTcb(
  raw: Uint8Array,
  product: Product | null
): TcbVersion {
  if (product === 'Turin') {
    return {
      fmc: raw[0],
      bootloader: raw[1],
      tee: raw[2],
      snp: raw[3],
      microcode: raw[7],
      raw: toHex(raw)
    };
  }
  return {
    bootloader: raw[0],
    tee: raw[1],
    snp: raw[6],
    microcode: raw[7],
    raw: toHex(raw)
  };
}

function signingKeyName(bits: number): SigningKeyName {
  switch (bits) {
    case 0:
      return 'VCEK';
    case 1:
      return 'VLEK';
    case 7:
      return 'NONE';
    default:
      return `reserved(${bits})`;
  }
}

function u64Hex(view: DataView, offset: number): string {
  return `0x${view.getBigUint64(offset, true).toString(16)}`;
}

function policyBits(view: DataView): GuestPolicyBits {
  const raw = view.getBigUint64(0x008, true);
  const bit = (n: number): boolean =>
    ((raw >> BigInt(n)) & BigInt(1)) === BigInt(1);
  return {
    raw: `0x${raw.toString(16)}`,
    abi: `${Number((raw >> BigInt(8)) & BigInt(0xff))}.${Number(raw & BigInt(0xff))}`,
    smt: bit(16),
    migrate_ma: bit(18),
    debug: bit(19),
    single_socket: bit(20),
    cxl_allowed: bit(21),
    mem_aes_256_xts: bit(22),
    rapl_disabled: bit(23),
    ciphertext_hiding: bit(24),
    page_swap_disabled: bit(25)
  };
}

/** The big-endian value of a little-endian 72-byte signature slot's low 48 bytes (WebCrypto's r or s). */
export function signatureComponent(
  report: Uint8Array,
  slot: 0 | 1
): Uint8Array {
  const start = SIGNED_SIZE + slot * SIGNATURE_SLOT;
  return report.slice(start, start + P384_COMPONENT).reverse();
}

/** Where the signature area holds non-zero bytes outside the 48-byte r and s values. */
export function signaturePaddingProblems(report: Uint8Array): string[] {
  const problems: string[] = [];
  const nonZero = (from: number, to: number): boolean =>
    report.subarray(from, to).some(b => b !== 0);
  for (const [name, slot] of [
    ['r', 0],
    ['s', 1]
  ] as const) {
    const start = SIGNED_SIZE + slot * SIGNATURE_SLOT;
    if (nonZero(start + P384_COMPONENT, start + SIGNATURE_SLOT)) {
      problems.push(`${name} has non-zero bytes above its 48 P-384 bytes`);
    }
  }
  if (nonZero(SIGNED_SIZE + 2 * SIGNATURE_SLOT, REPORT_SIZE)) {
    problems.push('signature bytes 0x330..0x49F must be zero');
  }
  return problems;
}

/**
 * Decode a report. `product` overrides the CPUID-derived product (a v2 report names none; the verified chain's
 * pinned root does), which decides the TCB layout.
 */
export function decodeReport(
  report: Uint8Array,
  product?: Product | null
): DecodedReport {
  if (report.length !== REPORT_SIZE) {
    throw new ReportFormatError(
      `an ATTESTATION_REPORT is ${REPORT_SIZE} bytes; this input is ${report.length} bytes`
    );
  }
  const view = new DataView(
    report.buffer,
    report.byteOffset,
    report.byteLength
  );
  const version = view.getUint32(0x000, true);
  if (!SUPPORTED_VERSIONS.includes(version)) {
    throw new ReportFormatError(
      `report version ${version} is not supported (known layouts: ${SUPPORTED_VERSIONS.join(', ')})`
    );
  }
  const hex = (offset: number, size: number): string =>
    toHex(report.subarray(offset, offset + size));
  const cpuid =
    version >= 3
      ? { family: report[0x188], model: report[0x189], stepping: report[0x18a] }
      : null;
  const chosen =
    product ?? (cpuid ? productFromCpuid(cpuid.family, cpuid.model) : null);
  const tcb = (offset: number): TcbVersion =>
    decodeTcb(report.subarray(offset, offset + 8), chosen);
  const keyInfo = view.getUint32(0x048, true);
  const firmware = (offset: number): string =>
    `${report[offset + 2]}.${report[offset + 1]}.${report[offset]}`;
  return {
    version,
    product: chosen,
    guestSvn: view.getUint32(0x004, true),
    policy: policyBits(view),
    familyId: hex(0x010, 16),
    imageId: hex(0x020, 16),
    vmpl: view.getUint32(0x030, true),
    signatureAlgo: view.getUint32(0x034, true),
    currentTcb: tcb(0x038),
    platformInfo: u64Hex(view, 0x040),
    keyInfo: `0x${keyInfo.toString(16)}`,
    signingKey: signingKeyName((keyInfo >> 2) & 0b111),
    maskChipKey: ((keyInfo >> 1) & 1) === 1,
    reportData: hex(0x050, 64),
    measurement: hex(0x090, 48),
    hostData: hex(0x0c0, 32),
    idKeyDigest: hex(0x0e0, 48),
    authorKeyDigest: hex(0x110, 48),
    reportId: hex(0x140, 32),
    reportIdMa: hex(0x160, 32),
    reportedTcb: tcb(0x180),
    cpuid,
    chipId: hex(0x1a0, 64),
    committedTcb: tcb(0x1e0),
    currentFirmware: firmware(0x1e8),
    committedFirmware: firmware(0x1ec),
    launchTcb: tcb(0x1f0),
    launchMitVector: version >= 5 ? u64Hex(view, 0x1f8) : null,
    currentMitVector: version >= 5 ? u64Hex(view, 0x200) : null,
    signature: {
      r: toHex(signatureComponent(report, 0)),
      s: toHex(signatureComponent(report, 1))
    }
  };
}
