"""`python -m mdpo.eval ...` is `mdpo-eval ...` (for torchrun / accelerate launch)."""
from .cli import main

raise SystemExit(main())
