"""The README walkthrough "Train on your own data", run verbatim on a small JSON Lines corpus."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys

from tests.fixtures import ROOT

from jaxllm.data.corpus import embedded_documents


def walkthrough_commands():
    with open(f"{ROOT}/README.md") as f:
        text = f.read()
    section = text.split("## Train on your own data", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def console_scripts(bin_dir):
    """Where the package is not installed, stand-ins for its console scripts (same mains)."""
    for name, module in (("jaxllm-train", "jaxllm.cli.train"), ("jaxllm-eval", "jaxllm.cli.eval"),
                         ("jaxllm-sample", "jaxllm.cli.sample")):
        if shutil.which(name):
            continue
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "import sys; '
                        f'from {module} import main; sys.exit(main())" "$@"\n')
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_walkthrough_runs_verbatim(tmp_path):
    commands = walkthrough_commands()
    assert len(commands) == 7
    assert [c.split()[0 if c.startswith("jaxllm") else 1] for c in commands] == [
        "tools/train_tokenizer.py", "tools/prepare_data.py", "tools/seqlen_report.py",
        "jaxllm-train", "jaxllm-eval", "tools/plot_runs.py", "tools/export_hf.py"]
    # a small local corpus: 300 standard-library files as JSON Lines, one bad line
    with open(tmp_path / "corpus.jsonl", "w") as f:
        for i, (_, text) in enumerate(embedded_documents("train")):
            if i == 300:
                break
            f.write(json.dumps({"text": text[:4000]}) + "\n")
        f.write("{not json\n")
    os.symlink(os.path.join(ROOT, "tools"), tmp_path / "tools")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    console_scripts(bin_dir)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for cmd in commands:
        proc = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "tok" / "bpe.model").exists()
    assert json.loads((tmp_path / "data" / "corpus" / "manifest.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "runs" / "mine" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if r.get("split") == "eval"] == [30, 60]
    assert (tmp_path / "runs" / "mine.png").stat().st_size > 0
    assert (tmp_path / "hf" / "mine" / "model.safetensors").exists()
    assert (tmp_path / "hf" / "mine" / "config.json").exists()
