"""imagepipe command-line tools: the local runtime, the Atlas emulator and the deploy helpers."""
