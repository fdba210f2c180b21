"""The recipe helpers that experiment configs share: `common` (the trainer's fields at DiT's defaults, argument
parsing, the smoke-run shrink) and `families` (each model family at the papers' sizes on ImageNet 256x256).

The experiment configs themselves are the files in the repository's configs/, installed as `dyngen.configs`.
"""
