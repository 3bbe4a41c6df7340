/**
 * @jest-environment node
 */
/// <reference types="node" />
// Node 20's WebCrypto, the same API the browser gives the encryptor.

import * as fs from 'fs';
import * as path from 'path';

import {
  Aes256Gcm,
  CipherSuite,
  DhkemP256HkdfSha256,
  HkdfSha256
} from '@hpke/core';

import { CanonicalJsonError, canonicalJson } from '../canonical';
import {
  FIRST_PLAINTEXT_SIZE,
  HEADER_SIZE,
  PLAINTEXT_SEGMENT_SIZE,
  SEGMENT_SIZE,
  type UploadDescriptor,
  UploadEncryptionError,
  UploadEncryptor,
  ciphertextSize,
  segmentCount,
  uploadInfo
} from '../upload/encrypt';
import { concatBytes, fromHex, toBase64, toHex } from '../verify/bytes';

// Written by tests/labextension/test_browser_crypto.py: a kernel-like HPKE key and files to encrypt.
const INTEROP_DIR = process.env.CONFNB_TEST_INTEROP_DIR;

const suite = new CipherSuite({
  kem: new DhkemP256HkdfSha256(),
  kdf: new HkdfSha256(),
  aead: new Aes256Gcm()
});

const descriptor: UploadDescriptor = {
  format: 'confnb-upload/1',
  name: 'visits_2024',
  file_format: 'csv',
  filename: 'visites été.csv',
  policy: '[policy]\nmin_group_size = 10\n'
};

async function recipient(): Promise<{
  publicKeyB64: string;
  privateKey: CryptoKey;
}> {
  const pair = await suite.kem.generateKeyPair();
  const raw = new Uint8Array(
    await suite.kem.serializePublicKey(pair.publicKey)
  );
  return { publicKeyB64: toBase64(raw), privateKey: pair.privateKey };
}

async function openKey(
  privateKey: CryptoKey,
  sealed: Uint8Array,
  info: Uint8Array
): Promise<Uint8Array> {
  const enc = sealed.slice(0, 65);
  const ct = sealed.slice(65);
  return new Uint8Array(
    await suite.open({ recipientKey: privateKey, enc, info }, ct)
  );
}

async function collect(
  generator: AsyncGenerator<Uint8Array>
): Promise<Uint8Array[]> {
  const out: Uint8Array[] = [];
  for await (const segment of generator) {
    out.push(segment);
  }
  return out;
}

/** Tink's decryption, written out independently of the encryptor, to check what it produced. */
async function tinkDecrypt(
  key: Uint8Array,
  associatedData: Uint8Array,
  ciphertext: Uint8Array
): Promise<Uint8Array> {
  expect(ciphertext[0]).toBe(HEADER_SIZE);
  const salt = ciphertext.slice(1, 33);
  const prefix = ciphertext.slice(33, 40);
  const ikm = await crypto.subtle.importKey('raw', key, 'HKDF', false, [
    'deriveKey'
  ]);
  const aes = await crypto.subtle.deriveKey(
    { name: 'HKDF', hash: 'SHA-256', salt, info: associatedData },
    ikm,
    { name: 'AES-GCM', length: 256 },
    false,
    ['decrypt']
  );
  const parts: Uint8Array[] = [];
  let start = HEADER_SIZE;
  for (let index = 0; start < ciphertext.length; index++) {
    const end = Math.min((index + 1) * SEGMENT_SIZE, ciphertext.length);
    const iv = new Uint8Array(12);
    iv.set(prefix);
    new DataView(iv.buffer).setUint32(7, index);
    iv[11] = end === ciphertext.length ? 1 : 0;
    parts.push(
      new Uint8Array(
        await crypto.subtle.decrypt(
          { name: 'AES-GCM', iv },
          aes,
          ciphertext.slice(start, end)
        )
      )
    );
    start = end;
  }
  return concatBytes(...parts);
}

function pseudoRandom(size: number): Uint8Array {
  const out = new Uint8Array(size);
  for (let offset = 0; offset < size; offset += 65536) {
    crypto.getRandomValues(
      out.subarray(offset, Math.min(offset + 65536, size))
    );
  }
  return out;
}

/** A Blob that records how it is read, to hold the encryptor to one slice per segment. */
class RecordingBlob extends Blob {
  readonly slices: number[] = [];
  slice(start?: number, end?: number, contentType?: string): Blob {
    this.slices.push((end ?? this.size) - (start ?? 0));
    return super.slice(start, end, contentType);
  }
  arrayBuffer(): Promise<ArrayBuffer> {
    throw new Error('the whole file must never be read at once');
  }
}

describe('canonicalJson', () => {
  it("produces Python's canonical_claims bytes", () => {
    const value = {
      name: 'a"b\\c\n\t\u0001\u007f',
      zeta: 'é中😀',
      Alpha: '\u2028x',
      '\ue000': 'bmp-private',
      '😀': 'astral',
      b: ''
    };
    // confnb.attest.evidence.canonical_claims(value).hex()
    expect(toHex(canonicalJson(value))).toBe(
      '7b22416c706861223a22e280a878222c2262223a22222c226e616d65223a22615c22625c5c635c6e5c745c75303030317f222c' +
        '227a657461223a22c3a9e4b8adf09f9880222c22ee8080223a22626d702d70726976617465222c22f09f9880223a2261737472616c227d'
    );
  });

  it('refuses what Python cannot encode or would not accept', () => {
    expect(() => canonicalJson({ a: '\ud800' })).toThrow(CanonicalJsonError);
    expect(() => canonicalJson({ '\udc00x': 'a' })).toThrow(
      /unpaired surrogate/
    );
    expect(() =>
      canonicalJson({ a: 1 } as unknown as Record<string, string>)
    ).toThrow(/must be a string/);
  });
});

describe('Tink segment layout', () => {
  it.each([
    [0, HEADER_SIZE + 16],
    [1, HEADER_SIZE + 17],
    [FIRST_PLAINTEXT_SIZE, SEGMENT_SIZE],
    [FIRST_PLAINTEXT_SIZE + 1, SEGMENT_SIZE + 17],
    [FIRST_PLAINTEXT_SIZE + PLAINTEXT_SEGMENT_SIZE, 2 * SEGMENT_SIZE],
    [3 * 2 ** 30, 3 * 2 ** 30 + 3072 * 16 + HEADER_SIZE + 16]
  ])('a %d-byte plaintext is %d ciphertext bytes', (plain, cipher) => {
    expect(ciphertextSize(plain)).toBe(cipher);
  });

  it('refuses nonsense sizes', () => {
    expect(() => ciphertextSize(-1)).toThrow(UploadEncryptionError);
    expect(() => ciphertextSize(1.5)).toThrow(UploadEncryptionError);
  });
});

describe('UploadEncryptor', () => {
  it('round-trips a multi-segment file, reading one slice per segment', async () => {
    const { publicKeyB64, privateKey } = await recipient();
    const plaintext = pseudoRandom(
      FIRST_PLAINTEXT_SIZE + PLAINTEXT_SEGMENT_SIZE + 12345
    );
    const encryptor = await UploadEncryptor.create(publicKeyB64, descriptor);
    const blob = new RecordingBlob([plaintext]);
    const segments = await collect(encryptor.segments(blob));

    expect(segments.map(segment => segment.length)).toEqual([
      SEGMENT_SIZE,
      SEGMENT_SIZE,
      12345 + 16
    ]);
    expect(blob.slices).toEqual([
      FIRST_PLAINTEXT_SIZE,
      PLAINTEXT_SEGMENT_SIZE,
      12345
    ]);
    expect(segmentCount(plaintext.length)).toBe(3);
    const ciphertext = concatBytes(...segments);
    expect(ciphertext.length).toBe(encryptor.ciphertextSize(plaintext.length));

    const key = await openKey(
      privateKey,
      encryptor.sealedKey,
      await uploadInfo(descriptor)
    );
    expect(key.length).toBe(32);
    const decrypted = await tinkDecrypt(
      key,
      canonicalJson(descriptor),
      ciphertext
    );
    expect(Buffer.compare(decrypted, plaintext)).toBe(0); // toEqual walks 2 MiB element by element
  });

  it('binds key and data to the descriptor', async () => {
    const { publicKeyB64, privateKey } = await recipient();
    const encryptor = await UploadEncryptor.create(publicKeyB64, descriptor);
    const ciphertext = concatBytes(
      ...(await collect(encryptor.segments(new Blob(['a,b\n1,2\n']))))
    );
    const swapped = { ...descriptor, policy: '[policy]\nmin_group_size = 1\n' };
    await expect(
      openKey(privateKey, encryptor.sealedKey, await uploadInfo(swapped))
    ).rejects.toThrow();
    const key = await openKey(
      privateKey,
      encryptor.sealedKey,
      await uploadInfo(descriptor)
    );
    await expect(
      tinkDecrypt(key, canonicalJson(swapped), ciphertext)
    ).rejects.toThrow();
    expect(
      new TextDecoder().decode(
        await tinkDecrypt(key, canonicalJson(descriptor), ciphertext)
      )
    ).toBe('a,b\n1,2\n');
  });

  it('encrypts an empty file as one empty segment', async () => {
    const { publicKeyB64 } = await recipient();
    const encryptor = await UploadEncryptor.create(publicKeyB64, descriptor);
    const segments = await collect(encryptor.segments(new Blob([])));
    expect(segments.map(segment => segment.length)).toEqual([HEADER_SIZE + 16]);
  });

  it('encrypts one stream only, so nonces never repeat', async () => {
    const { publicKeyB64 } = await recipient();
    const encryptor = await UploadEncryptor.create(publicKeyB64, descriptor);
    await collect(encryptor.segments(new Blob(['x'])));
    await expect(collect(encryptor.segments(new Blob(['y'])))).rejects.toThrow(
      /one stream only/
    );
  });

  it('rejects bad descriptors and keys, saying why', async () => {
    const { publicKeyB64 } = await recipient();
    await expect(
      UploadEncryptor.create(publicKeyB64, { ...descriptor, name: 'a/b' })
    ).rejects.toThrow(/dataset name/);
    await expect(
      UploadEncryptor.create(publicKeyB64, {
        ...descriptor,
        file_format: 'xlsx' as UploadDescriptor['file_format']
      })
    ).rejects.toThrow(/file format/);
    await expect(UploadEncryptor.create('!!', descriptor)).rejects.toThrow(
      /base64/
    );
    await expect(
      UploadEncryptor.create(
        toBase64(fromHex('04' + '00'.repeat(64))),
        descriptor
      )
    ).rejects.toThrow(UploadEncryptionError);
    await expect(
      UploadEncryptor.create(publicKeyB64, descriptor, {
        salt: new Uint8Array(31)
      })
    ).rejects.toThrow(/salt must be 32 bytes/);
  });

  it('is deterministic given the test-only randomness, and nothing else', async () => {
    const { publicKeyB64 } = await recipient();
    const fixed = {
      contentKey: pseudoRandom(32),
      salt: pseudoRandom(32),
      noncePrefix: pseudoRandom(7)
    };
    const file = new Blob([pseudoRandom(5000)]);
    const one = concatBytes(
      ...(await collect(
        (
          await UploadEncryptor.create(publicKeyB64, descriptor, fixed)
        ).segments(file)
      ))
    );
    const two = concatBytes(
      ...(await collect(
        (
          await UploadEncryptor.create(publicKeyB64, descriptor, fixed)
        ).segments(file)
      ))
    );
    const other = concatBytes(
      ...(await collect(
        (await UploadEncryptor.create(publicKeyB64, descriptor)).segments(file)
      ))
    );
    expect(Buffer.compare(one, two)).toBe(0);
    expect(Buffer.compare(other, one)).not.toBe(0);
    expect(one.subarray(1, 33)).toEqual(fixed.salt);
  });
});

const describeInterop = INTEROP_DIR ? describe : describe.skip;

type InteropCase = {
  name: string;
  descriptor: UploadDescriptor;
  plaintext: string;
  content_key: string;
  salt: string;
  nonce_prefix: string;
};

describeInterop(
  'interoperability with confnb.hpke and confnb.datasets.streaming_aead (CONFNB_TEST_INTEROP_DIR)',
  () => {
    const dir = INTEROP_DIR ?? '';
    const spec = (): { hpke_public_key: string; cases: InteropCase[] } =>
      JSON.parse(fs.readFileSync(path.join(dir, 'interop.json'), 'utf8'));

    it('encrypts each case with fresh and with fixed randomness for Python to open', async () => {
      const { hpke_public_key: publicKey, cases } = spec();
      expect(cases.length).toBeGreaterThan(0);
      for (const item of cases) {
        const file = new Blob([
          fs.readFileSync(path.join(dir, item.plaintext))
        ]);
        const runs = {
          random: {},
          fixed: {
            contentKey: fromHex(item.content_key),
            salt: fromHex(item.salt),
            noncePrefix: fromHex(item.nonce_prefix)
          }
        };
        for (const [run, options] of Object.entries(runs)) {
          const encryptor = await UploadEncryptor.create(
            publicKey,
            item.descriptor,
            options
          );
          const ciphertext = concatBytes(
            ...(await collect(encryptor.segments(file)))
          );
          expect(ciphertext.length).toBe(ciphertextSize(file.size));
          fs.writeFileSync(
            path.join(dir, `${item.name}.${run}.ct`),
            ciphertext
          );
          fs.writeFileSync(
            path.join(dir, `${item.name}.${run}.sealed`),
            encryptor.sealedKey
          );
        }
      }
    });

    it("is byte-identical to Python's StreamEncryptor with the same key, salt and nonce prefix", async () => {
      for (const item of spec().cases) {
        const python = new Uint8Array(
          fs.readFileSync(path.join(dir, `${item.name}.python.ct`))
        );
        const mine = new Uint8Array(
          fs.readFileSync(path.join(dir, `${item.name}.fixed.ct`))
        );
        expect(mine.length).toBe(python.length);
        expect(toHex(mine.subarray(0, 64))).toBe(toHex(python.subarray(0, 64)));
        expect(Buffer.compare(mine, python)).toBe(0);
      }
    });
  }
);
