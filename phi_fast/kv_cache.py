"""Paged KV cache: a pool of pages per layer, an allocator with reference counts, per-sequence page lists.

Layout (design.md section 2): per layer, key and value caches of [num_pages, page_size, num_heads, head_dim].
A page shared by several sequences (same prefix) is never written while shared: a sequence about to write
into a shared, partially filled last page first copies it (copy on write).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


class CacheFullError(RuntimeError):
    """The KV cache has no free page for a request."""


class PagePool:
    """K/V pages for every layer and the allocator that hands them out."""

    def __init__(self, *, num_layers: int, num_heads: int, head_dim: int, num_pages: int, page_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if num_pages < 1:
            raise ValueError(f"KV cache needs at least one page, got num_pages={num_pages}")
        shape = (num_pages, page_size, num_heads, head_dim)
        self.key_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.page_size = page_size
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_pages

    @staticmethod
    def page_bytes(num_layers: int, num_heads: int, head_dim: int, page_size: int, dtype: torch.dtype) -> int:
        """Bytes one page costs across all layers, K and V."""
        return 2 * num_layers * page_size * num_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @staticmethod
    def pages_for_budget(budget: int | float, page_bytes: int, device: torch.device | str) -> int:
        """budget: bytes (int) or a fraction (0, 1] of the device's free memory (float) -> number of pages."""
        if isinstance(budget, float):
            if not 0.0 < budget <= 1.0:
                raise ValueError(f"cache memory fraction must be in (0, 1], got {budget}")
            if torch.device(device).type == "cuda":
                free = torch.cuda.mem_get_info(torch.device(device))[0]
            else:
                free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = int(free * budget)
        return budget // page_bytes

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def allocate(self, n: int) -> list[int]:
        """n fresh pages (refcount 1), or CacheFullError with nothing taken."""
        if n > len(self._free):
            raise CacheFullError(f"KV cache full: need {n} pages, {len(self._free)} of {self.num_pages} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        """Another sequence now also holds these pages."""
        for p in pages:
            self._refs[p] += 1

    def release(self, pages: list[int]) -> None:
        """Drop one holder of each page; pages nobody holds go back to the free list."""
        for p in pages:
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)

    def copy_page(self, src: int, dst: int) -> None:
        for kc, vc in zip(self.key_caches, self.value_caches):
            kc[dst].copy_(kc[src])
            vc[dst].copy_(vc[src])


class SequencePages:
    """The pages of one sequence in order, and how many of its tokens they hold."""

    def __init__(self) -> None:
        self.pages: list[int] = []
        self.length = 0

    def pages_needed(self, pool: PagePool, n_new: int) -> int:
        """Fresh pages that `reserve(pool, n_new)` would take (including a copy-on-write page)."""
        total = -(-(self.length + n_new) // pool.page_size)
        cow = int(self._last_page_shared(pool) and n_new > 0)
        return total - len(self.pages) + cow

    def reserve(self, pool: PagePool, n_new: int) -> list[int]:
        """Make room for n_new tokens -> their cache slots (page * page_size + offset), all or nothing."""
        need = self.pages_needed(pool, n_new)
        fresh = pool.allocate(need)  # raises before anything changes
        if self._last_page_shared(pool) and n_new > 0:
            cow = fresh.pop()
            pool.copy_page(self.pages[-1], cow)
            pool.release([self.pages[-1]])
            self.pages[-1] = cow
        self.pages.extend(fresh)
        ps = pool.page_size
        slots = [self.pages[i // ps] * ps + i % ps for i in range(self.length, self.length + n_new)]
        self.length += n_new
        return slots

    def share_from(self, pool: PagePool, other: "SequencePages", n_tokens: int) -> None:
        """Start this (empty) sequence with the first n_tokens of `other`, sharing its pages."""
        assert not self.pages, "share_from needs an empty sequence"
        pages = other.pages[: -(-n_tokens // pool.page_size)]
        pool.share(pages)
        self.pages = list(pages)
        self.length = n_tokens

    def truncate(self, pool: PagePool, n_pages: int) -> None:
        """Keep the first n_pages pages and the tokens they hold; the later pages go back to the pool."""
        pool.release(self.pages[n_pages:])
        self.pages = self.pages[:n_pages]
        self.length = min(self.length, n_pages * pool.page_size)

    def free(self, pool: PagePool) -> None:
        pool.release(self.pages)
        self.pages = []
        self.length = 0

    def _last_page_shared(self, pool: PagePool) -> bool:
        return bool(self.pages) and self.length % pool.page_size != 0 and pool.refcount(self.pages[-1]) > 1
