/**
 * Encrypting a file in the browser for the kernel, so that the Jupyter server in between only ever sees
 * ciphertext.
 *
 * A fresh 32-byte content key K is HPKE-sealed (RFC 9180 base mode, DHKEM(P-256, HKDF-SHA256) / HKDF-SHA256 /
 * AES-256-GCM, exactly `confnb.hpke.seal`) to the kernel's attested key, with
 * `info = "confnb-upload/1:" + sha256hex(canonical(descriptor))`. The file is encrypted under K with Tink's
 * streaming AEAD AES256_GCM_HKDF_1MB (the format of `confnb.datasets.streaming_aead`), associated data =
 * canonical(descriptor). The descriptor (name, format, policy) is therefore bound twice: a server that swaps any
 * of it makes both the key and the data fail to open.
 *
 * Tink's format, for these parameters (https://developers.google.com/tink/streaming-aead/aes_gcm_hkdf_streaming):
 * header = 0x28 || salt (32) || nonce prefix (7); the segment key = HKDF-SHA256(K, salt, info = associated data);
 * segment i = AES-256-GCM(nonce = prefix || uint32_be(i) || last flag, no AAD); ciphertext segments are 1 MiB,
 * the header counting as part of the first.
 */

import {
  Aes256Gcm,
  CipherSuite,
  DhkemP256HkdfSha256,
  HkdfSha256
} from '@hpke/core';

import { canonicalJson } from '../canonical';
import {
  concatBytes,
  exactBuffer,
  fromBase64,
  sha256Hex
} from '../verify/bytes';

export { canonicalJson } from '../canonical';

export const UPLOAD_FORMAT = 'confnb-upload/1';
export const FILE_FORMATS = ['csv', 'parquet', 'arrow'] as const;
export type FileFormat = (typeof FILE_FORMATS)[number];

export type UploadDescriptor = {
  format: 'confnb-upload/1';
  name: string;
  file_format: FileFormat;
  filename: string;
  policy: string;
};

/** Tink AES256_GCM_HKDF_1MB. */
export const SEGMENT_SIZE = 1 << 20;
export const TAG_SIZE = 16;
export const KEY_SIZE = 32;
export const SALT_SIZE = 32;
export const NONCE_PREFIX_SIZE = 7;
export const HEADER_SIZE = 1 + SALT_SIZE + NONCE_PREFIX_SIZE;
/** Plaintext bytes of a full first segment (the header takes its share) and of every later one. */
export const FIRST_PLAINTEXT_SIZE = SEGMENT_SIZE - HEADER_SIZE - TAG_SIZE;
export const PLAINTEXT_SEGMENT_SIZE = SEGMENT_SIZE - TAG_SIZE;
/** The segment number is a 32-bit counter in the nonce. */
const MAX_SEGMENTS = 2 ** 32;
/** The relay refuses ciphertexts above 4 GiB. */
export const MAX_CIPHERTEXT_SIZE = 4 * 2 ** 30;

const DATASET_NAME = /^[A-Za-z0-9_.-]{1,64}$/;

/** A descriptor or key the encryptor refuses, or misuse that would reuse nonces. */
export class UploadEncryptionError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UploadEncryptionError';
  }
}

/**
 * Fixed randomness, for tests that compare ciphertexts byte for byte with the Python implementation. Never pass
 * these in production: a repeated key, salt or nonce prefix destroys confidentiality.
 */
export type UploadEncryptorTestOptions = {
  contentKey?: Uint8Array;
  salt?: Uint8Array;
  noncePrefix?: Uint8Array;
};

const suite = new CipherSuite({
  kem: new DhkemP256HkdfSha256(),
  kdf: new HkdfSha256(),
  aead: new Aes256Gcm()
});

/** Where the descriptor departs from the format the relay accepts (empty when it is fine). */
export function descriptorProblems(descriptor: UploadDescriptor): string[] {
  const problems: string[] = [];
  const fields: Record<string, unknown> = { ...descriptor };
  const expected = ['file_format', 'filename', 'format', 'name', 'policy'];
  const keys = Object.keys(fields).sort();
  if (keys.join(',') !== expected.join(',')) {
    problems.push(
      `descriptor fields are ${keys.join(', ')}; expected ${expected.join(', ')}`
    );
  }
  for (const key of keys) {
    if (typeof fields[key] !== 'string') {
      problems.push(`descriptor field ${key} must be a string`);
    }
  }
  if (descriptor.format !== UPLOAD_FORMAT) {
    problems.push(`descriptor format must be ${UPLOAD_FORMAT}`);
  }
  if (
    typeof descriptor.name !== 'string' ||
    !DATASET_NAME.test(descriptor.name)
  ) {
    problems.push(
      'dataset name must be 1 to 64 characters of A-Z, a-z, 0-9, "_", "." and "-"'
    );
  }
  if (!(FILE_FORMATS as readonly string[]).includes(descriptor.file_format)) {
    problems.push(`file format must be one of ${FILE_FORMATS.join(', ')}`);
  }
  return problems;
}

/** Ciphertext bytes for a plaintext of this size (Tink: no empty trailing segment; empty input = one segment). */
export function ciphertextSize(plaintextSize: number): number {
  if (!Number.isSafeInteger(plaintextSize) || plaintextSize < 0) {
    throw new UploadEncryptionError(
      `plaintext size must be a non-negative integer, not ${plaintextSize}`
    );
  }
  const virtual = plaintextSize + HEADER_SIZE;
  const full = Math.floor(virtual / PLAINTEXT_SEGMENT_SIZE);
  const rest = virtual % PLAINTEXT_SEGMENT_SIZE;
  return full * SEGMENT_SIZE + (rest ? rest + TAG_SIZE : 0);
}

/** How many segments a plaintext of this size takes. */
export function segmentCount(plaintextSize: number): number {
  if (plaintextSize <= FIRST_PLAINTEXT_SIZE) {
    return 1;
  }
  return (
    1 +
    Math.ceil((plaintextSize - FIRST_PLAINTEXT_SIZE) / PLAINTEXT_SEGMENT_SIZE)
  );
}

function randomOrGiven(
  given: Uint8Array | undefined,
  size: number,
  what: string
): Uint8Array {
  if (given === undefined) {
    return crypto.getRandomValues(new Uint8Array(size));
  }
  if (given.length !== size) {
    throw new UploadEncryptionError(
      `${what} must be ${size} bytes, not ${given.length}`
    );
  }
  return Uint8Array.from(given);
}

function segmentNonce(
  prefix: Uint8Array,
  index: number,
  last: boolean
): Uint8Array {
  const nonce = new Uint8Array(NONCE_PREFIX_SIZE + 5);
  nonce.set(prefix, 0);
  new DataView(nonce.buffer).setUint32(NONCE_PREFIX_SIZE, index, false);
  nonce[NONCE_PREFIX_SIZE + 4] = last ? 1 : 0;
  return nonce;
}

/** The HPKE `info` of an upload: binds the sealed key to this exact descriptor. */
export async function uploadInfo(
  descriptor: UploadDescriptor
): Promise<Uint8Array> {
  const digest = await sha256Hex(canonicalJson({ ...descriptor }));
  return new TextEncoder().encode(`${UPLOAD_FORMAT}:${digest}`);
}

/** HPKE-seal `plaintext` to a raw uncompressed P-256 key: `enc || ct`, as `confnb.hpke.seal` returns it. */
export async function hpkeSeal(
  recipientPublicKey: Uint8Array,
  plaintext: Uint8Array,
  info: Uint8Array
): Promise<Uint8Array> {
  if (recipientPublicKey.length !== 65 || recipientPublicKey[0] !== 0x04) {
    throw new UploadEncryptionError(
      'the kernel HPKE key must be an uncompressed P-256 point of 65 bytes'
    );
  }
  let key: CryptoKey;
  try {
    key = await suite.kem.deserializePublicKey(exactBuffer(recipientPublicKey));
  } catch {
    throw new UploadEncryptionError(
      'the kernel HPKE key is not a point on P-256'
    );
  }
  const sealed = await suite.seal(
    { recipientPublicKey: key, info: exactBuffer(info) },
    exactBuffer(plaintext)
  );
  return concatBytes(new Uint8Array(sealed.enc), new Uint8Array(sealed.ct));
}

/**
 * Encrypts one file for one upload. Each instance holds one content key, salt and nonce prefix, so it encrypts
 * exactly one stream: {@link segments} refuses a second call, which would reuse nonces under the same key.
 */
export class UploadEncryptor {
  /** HPKE `enc || ct` of the content key, for the `begin` message. */
  readonly sealedKey: Uint8Array;
  readonly descriptor: UploadDescriptor;
  private readonly header: Uint8Array;
  private readonly noncePrefix: Uint8Array;
  private readonly segmentKey: CryptoKey;
  private used = false;

  private constructor(
    descriptor: UploadDescriptor,
    sealedKey: Uint8Array,
    header: Uint8Array,
    noncePrefix: Uint8Array,
    segmentKey: CryptoKey
  ) {
    this.descriptor = descriptor;
    this.sealedKey = sealedKey;
    this.header = header;
    this.noncePrefix = noncePrefix;
    this.segmentKey = segmentKey;
  }

  /**
   * Draw a content key, seal it to `hpkePublicKeyB64` (the kernel's attested `hpke_public_key` claim) and derive
   * the stream's segment key. `testOptions` fixes the randomness for interoperability tests only.
   */
  static async create(
    hpkePublicKeyB64: string,
    descriptor: UploadDescriptor,
    testOptions: UploadEncryptorTestOptions = {}
  ): Promise<UploadEncryptor> {
    const problems = descriptorProblems(descriptor);
    if (problems.length) {
      throw new UploadEncryptionError(problems.join('; '));
    }
    let recipient: Uint8Array;
    try {
      recipient = fromBase64(hpkePublicKeyB64);
    } catch {
      throw new UploadEncryptionError(
        'the kernel HPKE key is not valid base64'
      );
    }
    const fixed: UploadDescriptor = { ...descriptor };
    const associatedData = canonicalJson({ ...fixed });
    const contentKey = randomOrGiven(
      testOptions.contentKey,
      KEY_SIZE,
      'the content key'
    );
    const salt = randomOrGiven(testOptions.salt, SALT_SIZE, 'the salt');
    const noncePrefix = randomOrGiven(
      testOptions.noncePrefix,
      NONCE_PREFIX_SIZE,
      'the nonce prefix'
    );
    try {
      const sealedKey = await hpkeSeal(
        recipient,
        contentKey,
        await uploadInfo(fixed)
      );
      const ikm = await crypto.subtle.importKey(
        'raw',
        exactBuffer(contentKey),
        'HKDF',
        false,
        ['deriveKey']
      );
      const segmentKey = await crypto.subtle.deriveKey(
        {
          name: 'HKDF',
          hash: 'SHA-256',
          salt: exactBuffer(salt),
          info: exactBuffer(associatedData)
        },
        ikm,
        { name: 'AES-GCM', length: 256 },
        false,
        ['encrypt']
      );
      const header = concatBytes(Uint8Array.of(HEADER_SIZE), salt, noncePrefix);
      return new UploadEncryptor(
        fixed,
        sealedKey,
        header,
        noncePrefix,
        segmentKey
      );
    } finally {
      contentKey.fill(0); // only the non-extractable segment key and the sealed copy remain
    }
  }

  ciphertextSize(plaintextSize: number): number {
    return ciphertextSize(plaintextSize);
  }

  /**
   * The ciphertext, one segment per item (the first item is header + segment 0, 1 MiB in all). Reads `file` one
   * slice per segment, so memory stays at about two segments whatever the file's size.
   */
  async *segments(file: Blob): AsyncGenerator<Uint8Array> {
    if (this.used) {
      throw new UploadEncryptionError(
        'an UploadEncryptor encrypts one stream only (nonces would repeat)'
      );
    }
    this.used = true;
    const size = file.size;
    if (ciphertextSize(size) > MAX_CIPHERTEXT_SIZE) {
      throw new UploadEncryptionError(
        `the file is too large: the ciphertext would exceed 4 GiB`
      );
    }
    const count = segmentCount(size);
    if (count > MAX_SEGMENTS) {
      throw new UploadEncryptionError(
        "the file exceeds Tink's 32-bit segment counter"
      );
    }
    let offset = 0;
    for (let index = 0; index < count; index++) {
      const take = Math.min(
        index === 0 ? FIRST_PLAINTEXT_SIZE : PLAINTEXT_SEGMENT_SIZE,
        size - offset
      );
      const plaintext = new Uint8Array(
        await file.slice(offset, offset + take).arrayBuffer()
      );
      if (plaintext.length !== take) {
        throw new UploadEncryptionError(
          `the file changed while it was read (segment ${index} is short)`
        );
      }
      offset += take;
      const last = index === count - 1;
      const sealed = new Uint8Array(
        await crypto.subtle.encrypt(
          {
            name: 'AES-GCM',
            iv: exactBuffer(segmentNonce(this.noncePrefix, index, last)),
            tagLength: 128
          },
          this.segmentKey,
          plaintext
        )
      );
      yield index === 0 ? concatBytes(this.header, sealed) : sealed;
    }
  }
}
