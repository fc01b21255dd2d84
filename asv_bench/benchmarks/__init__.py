"""fastlsm's asv benchmarks; ../README.md says how to run them."""
