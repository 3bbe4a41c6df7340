// JupyterLab's test shim patches the DOM; specs that declare `@jest-environment node` (to use Node's WebCrypto)
// have no DOM, so the shim is loaded only where there is one.
if (typeof window !== 'undefined') {
  require('@jupyterlab/testing/lib/jest-shim.js');
}
