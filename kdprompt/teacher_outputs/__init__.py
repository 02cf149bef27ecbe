"""The teacher-output cache (stage 2a / 2b): the teacher's image features of seeded augmented views.

``kdprompt teacher-outputs RECIPE`` (:mod:`.precompute`) runs the teacher once over every unlabelled image
of a distill recipe's shards, for ``teacher_outputs.views`` views each, and writes one safetensors part per
shard plus a manifest (:mod:`.manifest`). Distillation with ``teacher_outputs.use`` then re-creates one
stored view per image and epoch (:mod:`.replay`) and reads its features (:mod:`.reader`) instead of running
the teacher's image tower. :mod:`.teacher_ref` identifies the teacher without building it.

Modules are imported from their own names (nothing is re-exported here), so that the training loop can
import the reader without pulling in the precompute command.
"""
