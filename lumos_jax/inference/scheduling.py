"""The Engine's scheduling policy: which slots get KV blocks in a round, what is evicted or
preempted when the pool is full (a mixin of `engine.Engine`, kept apart so that the policy
reads as one piece; the bookkeeping it moves lives in `paged.PagedMemory`).

Generating slots go first, oldest first; then slots to prefill, oldest first, admitted only
while one free block per generating slot is left; idle slots are evicted least recently used
first; if nothing can move, the youngest running slot holding a block of its own is
preempted (see docs/inference.md, "Growth, eviction, preemption").
"""

from __future__ import annotations

from lumos_jax.inference.paged_slots import Slot, TurnResult


class Scheduling:
    """Needs the Engine's `_slots`, `memory`, `_stats`, `block_size`, `steps_per_call`,
    `max_len` and `_finish`."""

    def _evict_idle(self, keep: Slot) -> bool:
        """Free the blocks of the least recently used idle slot (its tokens stay on the
        host and are recomputed, or found in the prefix table, on its next turn)."""
        idle = [s for s in self._slots.values() if s.state == "idle" and s.blocks and s is not keep]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.last_used)
        self.memory.drop(victim)
        self._stats["evictions"] += 1
        return True

    def _grow(self, s: Slot, tokens: int) -> bool:
        return self.memory.grow(s, tokens, lambda: self._evict_idle(s))

    def _preempt(self, finished: list[TurnResult]) -> None:
        """Nothing could move: free the youngest running slot that holds a block of its own
        (it is recomputed later; dropping shared blocks alone would free nothing), or, if
        the oldest slot alone fills the pool, end its turn."""
        running = sorted((s for s in self._slots.values() if s.state != "idle"),
                         key=lambda s: s.order)
        refs = self.memory.pool.refs
        holders = [s for s in running[1:] if any(refs[b] == 1 for b in s.blocks)]
        if holders:
            victim = holders[-1]
            self.memory.drop(victim)
            if victim.state == "generating":
                victim.state = "prefill"
            self._stats["preemptions"] += 1
            return
        s = running[0]
        slot = next(i for i, v in self._slots.items() if v is s)
        if s.state != "generating":
            raise RuntimeError(f"slot {slot}: {len(s.history)} tokens cannot be placed in a "
                               f"pool of {self.memory.capacity_tokens} tokens")
        self._finish(slot, s, "length", None, finished)

    def _decode_need(self, s: Slot) -> int:
        """Positions a generating slot may fill in one decode call."""
        want = min(self.steps_per_call, s.params.max_new_tokens - len(s.generated))
        return min(s.cache_len + want, self.max_len)

    def _reserve(self) -> list[int]:
        """Blocks for this round. Generating slots first, oldest first: room for one decode
        call (a slot that gets none waits). Then slots to prefill, oldest first, each only
        while one free block per generating slot stays left after its own: a new turn, or a
        preempted slot, never takes the room the running slots grow into (without this the
        7B eval of 2026-12-02 thrashed: a preempted slot took its blocks straight back, 19k
        preemptions in 35 steps, the device idle). A slot whose next block an older slot
        computes in this round waits one round and takes it from the prefix table (sessions
        started together share their common prompt). Returns those to prefill."""
        order = sorted(self._slots.items(), key=lambda kv: kv[1].order)
        generating = [s for _, s in order if s.state == "generating"]
        for s in generating:
            self._grow(s, self._decode_need(s))
        pool, bs, keep = self.memory.pool, self.block_size, len(generating)
        ready, upcoming, evictable = [], set(), True   # nothing turns idle within a round
        for i, s in order:
            if s.state != "prefill":
                continue
            if pool.available <= keep and not evictable:
                continue                                # no room this round: skip the lookups
            before = s.cache_len
            saved = self.memory.match(s)
            todo = [self.memory.key(s, j) for j in self.memory.shareable(s)]
            need = min(-(-len(s.history) // bs), self.memory.max_blocks) - len(s.blocks)
            while pool.available < need + keep and evictable:
                evictable = self._evict_idle(s)
            if (todo and todo[0] in upcoming) or pool.available < need + keep or not self._grow(s, len(s.history)):
                self.memory.truncate(s, before)   # holds nothing new while it waits
                continue
            self._stats["prefix_saved_tokens"] += saved
            ready.append(i)
            upcoming.update(todo)
        return ready
