"""jaxllm: a JAX/Flax NNX pre-training stack for decoder-only language models.

Layers, lowest first. A module imports only from lower layers and from its own package
(or group, GROUPS below); packages on one line are siblings and never import each other
(tests/test_layers.py parses every import, function-local ones included). `config` reads
the choice registries of layers 1-2 by name when it validates (`config.SCHEMA`), the one
dependency that points up, at run time only:

    6  cli, tools/, python -m mains   entry points: flags, `error: ...` + exit 2
    5  experiments, budget,            workflows over the layers below: ablation grids,
       ablation_report | benchmark,    throughput (vs_torch: the same step side by side
       bench_report, vs_torch,         with PyTorch's nanoGPT architecture in torch_gpt),
       torch_gpt | sizing              memory
    4  train | eval | hf               the training loop; evaluation; HF export/import
    3  checkpoint, state, run,         Orbax checkpoints, the train state's layout,
       runfiles, workdir_lock          opening a run (config.json, newest good params),
                                       metrics.jsonl and the workdir lock
    2  model | data                    NNX modules, forward -> per-token NLL, bits per byte,
                                       sampling; tokenizers, corpora, grain pipeline,
                                       config resolution against the tokenizer
    1  kernels | optim | parallel      attention backends (no Flax), optax transforms,
       | isolate                       meshes and logical-axis rules, one-row subprocesses
    0  config | stats                  keys, defaults, validation (imports no jaxllm module);
                                       statistics of seeds (numpy, scipy)
"""

__version__ = "0.1.0"

# layer of each top-level module or package (the table above); GROUPS joins the modules of
# one layer that may import each other
LAYERS = {"config": 0, "kernels": 1, "optim": 1, "parallel": 1, "model": 2, "data": 2,
          "checkpoint": 3, "state": 3, "run": 3, "runfiles": 3, "workdir_lock": 3,
          "train": 4, "eval": 4, "hf": 4,
          "experiments": 5, "benchmark": 5, "bench_report": 5, "sizing": 5, "budget": 5,
          "ablation_report": 5, "vs_torch": 5, "torch_gpt": 5, "stats": 0, "isolate": 1,
          "cli": 6, "tools": 6}
GROUPS = {"experiments": "experiments", "budget": "experiments",
          "ablation_report": "experiments", "benchmark": "benchmark",
          "bench_report": "benchmark", "vs_torch": "benchmark", "torch_gpt": "benchmark",
          "checkpoint": "run",
          "state": "run", "run": "run", "runfiles": "run", "workdir_lock": "run",
          "cli": "entry", "tools": "entry"}

# Imports sit at the top of each module; a function-local import is kept only (checked by
# tests/test_layers.py) where the imported module is optional or slow to load (SLOW, by
# top-level name; ON_DEMAND: one platform's attention backend, the lm-eval adapter that
# needs the `eval` extra), or where the importing module must load without JAX (LIGHT):
# the entry points check their flags before JAX starts, and the PyTorch workers of the CPU
# benchmark never load XLA.
SLOW = ("torch", "lm_eval", "wandb", "tensorboardX", "pyarrow", "matplotlib", "scipy")
ON_DEMAND = ("kernels.cudnn", "kernels.flash", "kernels.flash_tpu", "kernels.splash",
             "eval.lm_eval_model")
LIGHT = ("cli", "tools", "config", "stats", "isolate", "bench_report", "torch_gpt", "vs_torch",
         "runfiles", "data", "data.corpus", "data.tokenizers", "data.tokenizer_training",
         "data.prepare", "data.resolve", "data.seqlen")
