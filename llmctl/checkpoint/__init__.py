"""Checkpoints: what `--model REF` names (refs), the files on disk (files, hf_dir), and the one
loader every reader uses (load).

This package sits below train/, generate/, eval/, serve/ and export/; it imports peft and
bitsandbytes only inside the functions that load an adapter or a 4-bit base. `refs` imports no
torch at all, so status and monitor may use it.
"""
