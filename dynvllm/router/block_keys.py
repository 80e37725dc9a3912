"""One engine's block hashes as router keys (pure; lives in the worker, next to its engine).

vLLM's events name blocks by engine hashes that only that engine can reproduce. The worker keys
them here, once, and relays keys: the router's ingest is then dictionary work only (no hashing of
token ids), and an event carries one int per block instead of a block of token ids. This is the
state one engine's events need, so it costs the worker little; a router following a thousand
workers would otherwise hold every worker's map.

Router events:
    ("stored", keys)    ("removed", keys)    ("cleared",)
"""

from __future__ import annotations

from dynvllm.router import hashing


class BlockKeys:
    def __init__(self) -> None:
        self._key: dict[int, int] = {}  # engine hash -> key
        # Blocks with equal tokens but different extra inputs (images, cache salt) are distinct to
        # the engine and one key to the router: a key is removed when its last block goes.
        self._held: dict[int, int] = {}
        self.orphans = 0  # stored blocks whose parent was never seen (a lost event upstream)

    def translate(self, event: tuple) -> tuple | None:
        """The router event for one decoded engine event (None: nothing for the router)."""
        kind = event[0]
        if kind == "stored":
            _, hashes, parent, tokens, block_size, lora = event
            parent_key = None
            if parent is not None:
                parent_key = self._key.get(parent)
                if parent_key is None:
                    self.orphans += 1
                    return None  # cannot be keyed; the router would never match it anyway
            keys = hashing.chain(tokens, block_size, lora, parent_key)[: len(hashes)]
            known, held = self._key, self._held
            for h, k in zip(hashes, keys, strict=False):
                if h not in known:
                    known[h] = k
                    held[k] = held.get(k, 0) + 1
            return ("stored", keys) if keys else None
        if kind == "removed":
            gone: list[int] = []
            known, held = self._key, self._held
            for h in event[1]:
                key = known.pop(h, None)
                if key is None:
                    continue
                left = held[key] - 1
                if left:
                    held[key] = left
                else:
                    del held[key]
                    gone.append(key)
            return ("removed", gone) if gone else None
        if kind == "cleared":
            self._key.clear()
            self._held.clear()
            return ("cleared",)
        return None

    def __len__(self) -> int:
        return len(self._key)
