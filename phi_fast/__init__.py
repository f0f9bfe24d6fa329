"""phi_fast: fast, faithful LLaVA-Phi (CLIP ViT-L/14-336 + projector + Phi-2) inference.

    import phi_fast
    print(phi_fast.generate("cat.jpg", "What is the cat doing?", model="path/to/llava-phi"))
    model = phi_fast.load("path/to/llava-phi", device="cuda", dtype="bfloat16")
    for piece in model.generate(image, prompt, stream=True): print(piece, end="")
"""

import signal as _signal
import threading as _threading

# The threads torch and friends start while they are imported never take SIGINT, so Ctrl-C always reaches the main
# thread, also while it waits in a system call (readline's select at the chat prompt), which only a signal to that
# very thread interrupts. The main thread's own mask is restored at once.
_mask = (_signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGINT})
         if hasattr(_signal, "pthread_sigmask") and _threading.current_thread() is _threading.main_thread() else None)
try:
    from .api import BatchError, Chat, Model, generate, load
finally:
    if _mask is not None:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, _mask)
    del _mask

__all__ = ["BatchError", "Chat", "Model", "generate", "load"]
__version__ = "0.1.0"
