"""How PeRL's commands end: without the interpreter's last garbage collection.

At exit CPython collects the whole heap a run leaves behind (torch, transformers, verl, vLLM, Ray:
millions of objects), ~2 s of CPU after `perl train` has printed its result on the 2-core box
(py-spy: `gc_collect_main` under the interpreter's finalisation). The process is ending, so nothing
needs that memory back: `gc.freeze()` moves every object to the permanent generation, which the
final collections skip. `atexit` handlers still run (logging's flush, `weakref.finalize`, e.g. a
`TemporaryDirectory`'s removal), and so does every deallocation by reference count, which closes
files; what is skipped is only the cycle collector's pass. Only for a command's own process: a caller
of `main()` (the tests) keeps collecting.
"""

from __future__ import annotations

import gc


def without_final_collection(code: int) -> int:
    """`code`, after freezing the heap: a command's last call, its files written and closed."""
    gc.freeze()
    return code
