# caddie: Parameter Golf as a Snakemake pipeline. See README.md.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/tokenize.smk"
include: "rules/curriculum.smk"
include: "rules/train.smk"
include: "rules/quantize.smk"
include: "rules/rescue.smk"
include: "rules/evaluate.smk"
include: "rules/aggregate.smk"
include: "rules/submission.smk"


rule all:
    default_target: True
    input:
        rules.aggregate.output,
