from kernel_enclave.vault.process import main

main()
