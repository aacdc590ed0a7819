"""Load tests and benchmarks for mint_proxy. Not collected by pytest; see loadtests/README.md."""
