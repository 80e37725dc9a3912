"""Worker-side keying of engine events, and keys equal in every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from dynvllm.router import hashing
from dynvllm.router.block_keys import BlockKeys

PROBE = (
    "import json; from dynvllm.router import hashing; "
    "print(json.dumps([hashing.chain(list(range(12)), 4, lora) for lora in (None, 'sql-adapter')]))"
)


def test_keys_are_equal_across_processes_and_hash_seeds():
    """Workers key blocks, the frontend keys prompts: in different processes, whatever
    PYTHONHASHSEED each has (str and None hash differently per process)."""
    seen = []
    for seed in ("1", "2", "random"):
        out = subprocess.run(
            [sys.executable, "-c", PROBE],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        seen.append(json.loads(out.stdout))
    here = [hashing.chain(list(range(12)), 4, lora) for lora in (None, "sql-adapter")]
    assert seen == [here, here, here]
    assert here[0] != here[1] and len(here[0]) == 3


def test_children_continue_their_parents_chain():
    keys = BlockKeys()
    first = keys.translate(("stored", [10, 11], None, list(range(8)), 4, None))
    child = keys.translate(("stored", [12], 11, list(range(8, 12)), 4, None))
    assert first[1] + child[1] == hashing.chain(list(range(12)), 4)
    assert first[0] == child[0] == "stored"


def test_unknown_parent_is_counted_and_not_relayed():
    keys = BlockKeys()
    assert keys.translate(("stored", [12], 99, list(range(4)), 4, None)) is None
    assert keys.orphans == 1 and len(keys) == 0


def test_a_key_goes_with_its_last_block():
    """Equal tokens under different extra inputs (an image, a cache salt) are two engine blocks
    and one router key: removing one of them must not tell the router the key is gone."""
    keys = BlockKeys()
    a = keys.translate(("stored", [1], None, [5, 6, 7, 8], 4, None))
    b = keys.translate(("stored", [2], None, [5, 6, 7, 8], 4, None))
    assert a == b
    assert keys.translate(("removed", [1])) is None
    assert keys.translate(("removed", [1])) is None  # a repeated removal changes nothing
    assert keys.translate(("removed", [2])) == ("removed", a[1])
    assert keys.translate(("removed", [3])) is None


def test_cleared_forgets_everything():
    keys = BlockKeys()
    keys.translate(("stored", [1, 2], None, list(range(8)), 4, None))
    assert keys.translate(("cleared",)) == ("cleared",)
    assert len(keys) == 0
    assert keys.translate(("stored", [3], 2, list(range(4)), 4, None)) is None


def test_lora_blocks_key_apart():
    keys = BlockKeys()
    base = keys.translate(("stored", [1], None, [1, 2, 3, 4], 4, None))
    lora = keys.translate(("stored", [2], None, [1, 2, 3, 4], 4, "sql"))
    assert base[1] == hashing.chain([1, 2, 3, 4], 4) and lora[1] == hashing.chain([1, 2, 3, 4], 4, "sql")
    assert base != lora
