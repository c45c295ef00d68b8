"""Did the alignment work? Multiple-choice benchmarks (TruthfulQA MC1/MC2, BIG-bench HHH) scored
with lm-evaluation-harness on task files shipped here, answers to the Vicuna / MT-bench questions,
and a pairwise judge over them. Used by `selfalign eval` and the pipeline's evaluate stage."""
