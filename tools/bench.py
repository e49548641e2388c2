"""Training-throughput benchmark (thin CLI over jaxllm.benchmark).

    python tools/bench.py --out=bench/                      # 124m..1.3b x 1024..8192 x rope,alibi
    python tools/bench.py --sizes=124m,350m --seq_lens=2048 --pos=alibi --batch=16
    python tools/bench.py --compare_backends --sizes=124m   # xla, cudnn|splash, flash attention
    python tools/bench.py --preset=nanogpt                  # GPT-2 124M, T=1024, 16 seq/device
    python tools/bench.py --tiny --out=/tmp/b               # seconds, on CPU (the test suite)
    python tools/bench.py --config=configs/mpt_style.py --config.model.remat=dots ...
    python tools/bench.py --vs_torch --out=bench/     # CPU: jaxllm vs nanoGPT's model in PyTorch

Rows are medians over --steps timed steps after --warmup steps; the table, bench.json and
bench.md (in --out) have the columns of MosaicML's llm-foundry throughput table.
--vs_torch (needs torch: pip install jaxllm[bench]) trains three fixed GPT-2-style shapes
(jaxllm.vs_torch.SHAPES; one tiny shape with --tiny) with jaxllm and with nanoGPT's
architecture in PyTorch (eager and torch.compile), interleaved in --rounds rounds of
--steps/--rounds steps each, and writes vs_torch.json and vs_torch.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags

from jaxllm import bench_report, isolate
from jaxllm import vs_torch as V
from jaxllm.cli import define_config_flag, parse_config
from jaxllm.cli.errors import check_output_dir, fail, user_errors

FLAGS = flags.FLAGS
ROOT = Path(__file__).resolve().parents[1]
flags.DEFINE_list("sizes", ["124m", "350m", "760m", "1.3b"],
                  "model sizes: 124m, 350m, 760m, 1.3b, tiny or d<d>l<layers>h<heads>")
flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192"], "sequence lengths")
flags.DEFINE_list("pos", ["rope", "alibi"], "position encodings: rope, alibi, learned, none")
flags.DEFINE_list("backends", [], "attention backends (auto, xla, cudnn, flash, splash); "
                  "default: the config's model.attention_backend")
flags.DEFINE_bool("compare_backends", False, "time the attention backends of this platform: "
                  "xla, cudnn, flash on GPU; xla, splash, flash on TPU")
flags.DEFINE_integer("batch", 0, "global batch in sequences (0: use --tokens_per_batch)")
flags.DEFINE_integer("tokens_per_batch", 0,
                     "global tokens per step, divided by each seq len (0: 16384 per device)")
flags.DEFINE_integer("steps", 10, "timed steps (the median is reported)")
flags.DEFINE_integer("warmup", 3, "untimed steps after compilation")
flags.DEFINE_integer("vocab", 50304, "vocabulary size where the config leaves it 0")
flags.DEFINE_string("out", "", "directory for bench.json and bench.md")
flags.DEFINE_bool("tiny", False, "a tiny grid that runs on CPU in seconds (flags still win)")
flags.DEFINE_enum("isolate", "auto", ["auto", "yes", "no"],
                  "one subprocess per configuration (per-config peak memory, OOM as a row); "
                  "auto = on accelerators")
flags.DEFINE_bool("vs_torch", False, "CPU: jaxllm vs nanoGPT's architecture in PyTorch")
flags.DEFINE_integer("rounds", 5, "--vs_torch: interleaved rounds (implementations take turns)")
flags.DEFINE_bool("torch_compile", True, "--vs_torch: also time torch.compile")
flags.DEFINE_enum("preset", "", ["", "nanogpt"],
                  "nanogpt: GPT-2 124M, learned positions, T=1024, 16 sequences per device, "
                  "printed beside the nanoGPT/JAX anchor measured on one H200")


def _ints(name):
    try:
        return [int(v) for v in FLAGS[name].value]
    except ValueError:
        fail(f"--{name}: must be comma-separated integers, got {','.join(FLAGS[name].value)}")


def _vs_torch(base):
    steps = FLAGS.steps if FLAGS["steps"].present or not FLAGS.tiny else 2
    rounds = FLAGS.rounds if FLAGS["rounds"].present or not FLAGS.tiny else 2
    if steps < 1 or rounds < 1 or FLAGS.warmup < 0:
        fail(f"--steps and --rounds must be >= 1, --warmup >= 0 "
              f"(got {steps}, {rounds}, {FLAGS.warmup})")
    impls = [i for i in V.IMPLS if FLAGS.torch_compile or i != "torch_compile"]
    report = V.compare(base, V.TINY_SHAPES if FLAGS.tiny else V.SHAPES, impls,
                       rounds=rounds, steps_per_round=max(steps // rounds, 1),
                       warmup=FLAGS.warmup, out_dir=FLAGS.out,
                       echo=lambda s: print(s, flush=True))
    print()
    print(V.markdown(report), end="")


def main(argv=None):
    argv = sys.argv if argv is None else argv
    if any(a in ("-h", "--help", "--helpshort") for a in argv[1:]):
        print(__doc__ + "\n" + FLAGS.module_help(sys.modules[__name__]))
        return
    define_config_flag(argv, default=str(ROOT / "configs" / "base.py"), help_text=(
        "base config file (configs/NAME.py[:ARG]); default: configs/base.py. --sizes, "
        "--seq_lens, --pos and --backends override its fields"))
    base = parse_config(FLAGS, argv)  # flags and config under the error contract
    with user_errors():
        if FLAGS.out:  # before minutes of benchmarking, not after
            check_output_dir(FLAGS.out, "--out")
        for name in ("steps", "warmup", "batch", "tokens_per_batch", "vocab"):
            if FLAGS[name].value < (1 if name in ("steps", "vocab") else 0):
                fail(f"out of range (--{name}={FLAGS[name].value}): must be >= "
                     f"{1 if name in ('steps', 'vocab') else 0}")
        import jax

        from jaxllm import kernels
        from jaxllm import benchmark as B

        if FLAGS.vs_torch:
            return _vs_torch(base)
        if FLAGS.isolate != "no":  # before JAX starts: children need the device memory
            isolate.keep_parent_light()
        opts = {"sizes": FLAGS.sizes, "seq_lens": _ints("seq_lens"), "pos": FLAGS.pos,
                "batch": FLAGS.batch, "steps": FLAGS.steps, "warmup": FLAGS.warmup,
                "vocab": FLAGS.vocab}
        presets = {"tiny": B.TINY if FLAGS.tiny else {},
                   "nanogpt": {"sizes": ["124m"], "seq_lens": [1024], "pos": ["learned"],
                               "batch": 16 * jax.device_count()}}
        for preset in (presets["tiny"], presets.get(FLAGS.preset, {})):
            for k, v in preset.items():
                if not FLAGS[k].present:
                    opts[k] = v
        backends = (list(kernels.compared_backends()) if FLAGS.compare_backends
                    else FLAGS.backends or [base.model.attention_backend])
        report = B.run(base, opts["sizes"], opts["seq_lens"], opts["pos"], backends,
                       batch=opts["batch"], tokens_per_batch=FLAGS.tokens_per_batch,
                       steps=opts["steps"], warmup=opts["warmup"], vocab=opts["vocab"],
                       isolate={"auto": None, "yes": True, "no": False}[FLAGS.isolate],
                       out_dir=FLAGS.out, echo=lambda s: print(s, flush=True))
        print()
        print(bench_report.markdown(report), end="")
        if FLAGS.preset == "nanogpt":
            print("\n" + "\n".join(bench_report.anchor_lines()))


if __name__ == "__main__":
    main()
