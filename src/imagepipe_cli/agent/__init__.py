"""`imagepipe agent`: runs rows on the user's own ComfyUI (the hybrid route) and says what became of each."""
