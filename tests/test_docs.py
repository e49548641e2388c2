"""README stays true: the config reference equals the schema, the quickstart has two commands."""

import re

from tests.fixtures import ROOT

from jaxllm.config import reference_markdown


def readme():
    with open(f"{ROOT}/README.md") as f:
        return f.read()


def test_config_reference_is_current():
    text = readme()
    start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end"
    block = text.split(start)[1].split(end)[0]
    assert block == reference_markdown()


def test_quickstart_has_exactly_two_commands():
    text = readme()
    quick = re.split(r"^## ", text.split("## Quickstart", 1)[1], flags=re.M)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick, flags=re.S)
    assert len(blocks) == 2
    assert all(len(b.strip().splitlines()) == 1 for b in blocks)
    with open(f"{ROOT}/.ci/run") as f:
        assert blocks[1].strip() in f.read()
