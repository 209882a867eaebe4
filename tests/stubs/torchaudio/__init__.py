# Test-only stand-in: LLaMA-Factory 0.9.5 imports torchaudio unconditionally (for audio data), and
# no torchaudio release installs beside torch 2.14.1. Text training never uses it; any use fails.
def __getattr__(name):
    raise AssertionError(f"the test's torchaudio stand-in was used (torchaudio.{name}): the training path needs real torchaudio")
