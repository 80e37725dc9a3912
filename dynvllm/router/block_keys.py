"""One engine's block hashes as router keys (pure; lives in the worker, next to its engine).

vLLM's events name blocks by engine hashes that only that engine can reproduce. The worker keys
them here, once, and relays keys: the router's ingest is then dictionary work only (no hashing of
token ids), and an event carries one int per block instead of a block of token ids. This is the
state one engine's events need, so it costs the worker little; a router following a thousand
workers would otherwise hold every worker's map.

Each tier (the GPU cache, and the CPU or disk tiers an offloading connector reports: see `tiers`)
holds its own blocks. A lower tier's store may come without tokens (vLLM's offloading connector
sends only the block hash unless its events are "self-describing"): such a block is keyed by the
key its hash has in another tier, as it was the GPU's block before it was offloaded.

Router events:
    ("stored", keys)    ("removed", keys)    ("cleared",)            the GPU cache
    ("stored", keys, tier)    ("removed", keys, tier)                an offload tier
"""

from __future__ import annotations

from dynvllm.router import hashing
from dynvllm.router.tiers import GPU, tier_of


class _Tier:
    __slots__ = ("dup", "held", "key")

    def __init__(self) -> None:
        self.key: dict[int, int] = {}  # engine hash -> key
        # Blocks with equal tokens but different engine hashes (a cache salt) are distinct to the
        # engine and one key to the router: a key is removed when its last block goes.
        self.held: dict[int, int] = {}
        # A hash announced again before its removal (offloading connectors re-announce blocks
        # shared by chunks): as many removals must follow before it goes.
        self.dup: dict[int, int] = {}


class BlockKeys:
    def __init__(self) -> None:
        self._tiers: dict[int, _Tier] = {GPU: _Tier()}
        self.orphans = 0  # stored blocks whose parent was never seen (a lost event upstream)

    def _lookup(self, h: int) -> int | None:
        for tier in self._tiers.values():
            key = tier.key.get(h)
            if key is not None:
                return key
        return None

    def translate(self, event: tuple) -> tuple | None:
        """The router event for one decoded engine event (None: nothing for the router)."""
        kind = event[0]
        if kind == "stored":
            hashes, parent, tokens, block_size, lora = event[1:6]
            tier_no = tier_of(event[6] if len(event) > 6 else None)
            if block_size <= 0 or not tokens:
                found = [(h, k) for h in hashes if (k := self._lookup(h)) is not None]
                self.orphans += len(hashes) - len(found)
                pairs = found
            else:
                parent_key = None
                if parent is not None:
                    parent_key = self._lookup(parent)
                    if parent_key is None:
                        self.orphans += 1
                        return None  # cannot be keyed; the router would never match it anyway
                extras = hashing.event_extras(event[7] if len(event) > 7 else None)
                keys = hashing.chain(tokens, block_size, lora, parent_key, extras)[: len(hashes)]
                pairs = list(zip(hashes, keys, strict=False))
            if not pairs:
                return None
            tier = self._tiers.get(tier_no) or self._tiers.setdefault(tier_no, _Tier())
            known, held, dup = tier.key, tier.held, tier.dup
            for h, k in pairs:
                if h not in known:
                    known[h] = k
                    held[k] = held.get(k, 0) + 1
                else:
                    dup[h] = dup.get(h, 0) + 1
            keys = [k for _, k in pairs]
            return ("stored", keys) if tier_no == GPU else ("stored", keys, tier_no)
        if kind == "removed":
            tier_no = tier_of(event[2] if len(event) > 2 else None)
            held_in = self._tiers.get(tier_no)
            if held_in is None:
                return None
            gone: list[int] = []
            known, held, dup = held_in.key, held_in.held, held_in.dup
            for h in event[1]:
                if dup and h in dup:
                    if dup[h] > 1:
                        dup[h] -= 1
                    else:
                        del dup[h]
                    continue
                key = known.pop(h, None)
                if key is None:
                    continue
                left = held[key] - 1
                if left:
                    held[key] = left
                else:
                    del held[key]
                    gone.append(key)
            if not gone:
                return None
            return ("removed", gone) if tier_no == GPU else ("removed", gone, tier_no)
        if kind == "cleared":
            # vLLM's prefix cache reset: the GPU's blocks; offload tiers report their own.
            self._tiers[GPU] = _Tier()
            return ("cleared",)
        return None

    def __len__(self) -> int:
        return len(self._tiers[GPU].key)
