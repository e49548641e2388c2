"""`python -m jaxllm.train` is `jaxllm-train`."""

from jaxllm.cli.train import main

main()
