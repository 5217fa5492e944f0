"""Alternative storage forms for quantized matrices (the seed PRs' ideas), each a stored entry kind
with an encoder and a decoder. `DECODERS[kind](entry) -> fp32 tensor` is what the artifact loader uses."""

DECODERS = {}
