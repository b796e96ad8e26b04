"""Train the shipped demo models: a small EMO and its standard-MoE twin, on a corpus with
clearly distinct domains assembled offline from text that exists on a Debian/Python machine.

`python -m emo_serve.train --help` runs it; `corpus` builds the documents, `model` is the
batched trainable EMO (the same math as `emo_serve.reference`), `loop` trains and exports.
"""
