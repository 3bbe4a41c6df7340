/**
 * Trust anchors: AMD's root keys (ARKs), pinned by the SHA-256 of their DER certificates.
 *
 * The ARK that arrives with evidence is trusted only if its bytes hash to one of these values: anyone can mint a
 * self-signed certificate named "ARK-Milan". They are the values of `confnb.attest.roots.PINNED_ARK_SHA256` (taken
 * from the certificates AMD's KDS serves); the Python test suite checks that the two lists stay equal.
 */

import type { Product } from './report';

/** Product -> SHA-256 (lower-case hex) of AMD's ARK certificate for it, DER-encoded. */
export const AMD_ARK_FINGERPRINTS: Readonly<Record<Product, string>> =
  Object.freeze({
    Milan: '69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd',
    Genoa: '4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1',
    Turin: '1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a'
  });

/** The product whose pinned ARK has this fingerprint, or null if it is not one of AMD's roots. */
export function pinnedProduct(arkSha256: string): Product | null {
  const wanted = arkSha256.toLowerCase();
  for (const [product, fingerprint] of Object.entries(AMD_ARK_FINGERPRINTS)) {
    if (fingerprint === wanted) {
      return product as Product;
    }
  }
  return null;
}
