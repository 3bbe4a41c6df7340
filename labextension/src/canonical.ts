/**
 * The canonical JSON form that REPORT_DATA and upload descriptors commit to.
 *
 * It must produce exactly the bytes of Python's
 * `json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")`
 * (`confnb.attest.evidence.canonical_claims`), because the kernel hashes those bytes: one differing byte and
 * the report no longer vouches for the claims, or the upload's key no longer opens.
 */

/** A string that cannot be encoded as UTF-8 (an unpaired surrogate) or a value that is not a string. */
export class CanonicalJsonError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CanonicalJsonError';
  }
}

const encoder = new TextEncoder();

/**
 * Python sorts keys by code point; JavaScript's default sort compares UTF-16 code units, which orders characters
 * above U+FFFF before U+E000..U+FFFF. Comparing code point by code point keeps both sides in one order.
 */
function compareCodePoints(a: string, b: string): number {
  const left = Array.from(a);
  const right = Array.from(b);
  const length = Math.min(left.length, right.length);
  for (let i = 0; i < length; i++) {
    const difference = left[i].codePointAt(0)! - right[i].codePointAt(0)!;
    if (difference !== 0) {
      return difference;
    }
  }
  return left.length - right.length;
}

/**
 * Python refuses to UTF-8-encode a lone surrogate while TextEncoder silently replaces it with U+FFFD; refusing
 * here keeps the two sides from hashing different text.
 */
function checkWellFormed(text: string, what: string): void {
  for (let i = 0; i < text.length; i++) {
    const unit = text.charCodeAt(i);
    if (unit >= 0xd800 && unit <= 0xdbff) {
      const next = i + 1 < text.length ? text.charCodeAt(i + 1) : 0;
      if (next >= 0xdc00 && next <= 0xdfff) {
        i++;
        continue;
      }
      throw new CanonicalJsonError(
        `${what} contains an unpaired surrogate at index ${i}`
      );
    }
    if (unit >= 0xdc00 && unit <= 0xdfff) {
      throw new CanonicalJsonError(
        `${what} contains an unpaired surrogate at index ${i}`
      );
    }
  }
}

/**
 * UTF-8 JSON of a string-to-string object: keys sorted by code point, no whitespace, non-ASCII not escaped.
 *
 * `JSON.stringify` escapes strings exactly as Python's encoder with `ensure_ascii=False` does (the short escapes
 * for `"`, `\`, `\b`, `\f`, `\n`, `\r`, `\t`, lower-case `\u00XX` for other control characters, everything else
 * literal), so only the key order and the surrounding punctuation are built here.
 */
export function canonicalJson(o: Readonly<Record<string, string>>): Uint8Array {
  const keys = Object.keys(o).sort(compareCodePoints);
  const members = keys.map(key => {
    const value: unknown = o[key];
    if (typeof value !== 'string') {
      throw new CanonicalJsonError(
        `value of ${JSON.stringify(key)} must be a string, not ${typeof value}`
      );
    }
    checkWellFormed(key, 'a key');
    checkWellFormed(value, `the value of ${JSON.stringify(key)}`);
    return `${JSON.stringify(key)}:${JSON.stringify(value)}`;
  });
  return encoder.encode(`{${members.join(',')}}`);
}
