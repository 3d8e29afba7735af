"""Edge data planes: ``socket`` (FastAPI over the kernel's TCP stack) and ``gpu`` (GAZSI-style kernels)."""
