"""Plumbing every package of this repository may import, and that imports none of them: strict configs
(`common.config`), atomic files and settings records (`common.files`), process groups (`common.distributed`) and
command-line conventions (`common.cli`)."""
