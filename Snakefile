# caddie: Parameter Golf as a Snakemake pipeline. See README.md.
from snakemake.utils import min_version

from stages.checks import require_yaml

min_version("9.0")
require_yaml("config.yaml")  # snakemake's own error for it names neither the file nor the line


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/tokenize.smk"
include: "rules/curriculum.smk"
include: "rules/train.smk"
include: "rules/quantize.smk"
include: "rules/rescue.smk"
include: "rules/evaluate.smk"
include: "rules/export.smk"
include: "rules/aggregate.smk"
include: "rules/submission.smk"


rule all:
    default_target: True
    input:
        rules.aggregate.output,
