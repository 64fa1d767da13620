"""The CPU default's world: a miniature of the real recipe that every phase runs on a CPU.

- `world.shapes`: the procedural shapes world (GenEval's tasks, colours and position rule; captions, questions,
  held-out GenEval prompts); `world.captions`: its caption grammar and each caption's truth on an image;
- `world.export`: the world on disk in the formats the real loaders read; `world.dpg`: its DPG-Bench-style set;
- `world.detector`, `world.judge`: its exact GenEval detector and DPG judge (found by eval/ as the "shapes" plugins);
- `world.siglip`, `world.lm`, `world.pretrain`: its foundation models, a SigLIP and a Qwen3 pretrained on it, saved
  as the checkpoint folders real ones are; `world.probes`: what they know;
- `world.prepare`: the prepare step (`python scripts/prepare_world.py`) that writes all of it.

It sits above the GenEval rules it reuses (eval/) and the trainers' optimiser settings (train/); no trainer imports it.
"""
