"""Single-GPU RLHF (SFT -> reward model -> PPO) with QLoRA on TRL."""

import logging

__version__ = "0.1.0"

# On a CPU with AVX512-BF16, importing bitsandbytes warns on every run that it could not fetch an
# optional 4-bit inference kernel from the Hugging Face hub (package `kernels`). That kernel serves
# only the packed inference path that models.one_cpu_4bit_path turns off, and installing `kernels`
# would make the import download code: the warning is noise here, so it is kept out of the logs.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
