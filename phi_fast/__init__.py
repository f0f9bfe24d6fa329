"""phi_fast: fast, faithful LLaVA-Phi (CLIP ViT-L/14-336 + projector + Phi-2) inference.

    import phi_fast
    print(phi_fast.generate("cat.jpg", "What is the cat doing?", model="path/to/llava-phi"))
    model = phi_fast.load("path/to/llava-phi", device="cuda", dtype="bfloat16")
    for piece in model.generate(image, prompt, stream=True): print(piece, end="")
"""

from .api import BatchError, Chat, Model, generate, load

__all__ = ["BatchError", "Chat", "Model", "generate", "load"]
__version__ = "0.1.0"
