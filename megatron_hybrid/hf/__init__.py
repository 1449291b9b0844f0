"""Hugging Face ``olmo_hybrid`` I/O: one package for everything that reads or writes the HF format
(spec ``docs/model.md`` §6-§7).

- ``mapping``: HF <-> Megatron tensor names and layouts, config.json <-> ``OlmoHybridConfig``;
- ``io``: reading an HF directory (config.json, single or sharded safetensors);
- ``safetensors_writer``: writing safetensors shard by shard;
- ``exporter`` / ``importer``: Megatron checkpoint -> HF directory and back, streamed;
- ``validate``: a conversion checked by logits against transformers;
- ``converter_cli``: what the two converter tools share (quiet warnings, peak memory, exit codes);
- ``import_cli`` / ``export_cli``: their command lines (``tools/convert_hf_to_megatron.py``,
  ``tools/convert_megatron_to_hf.py``).
"""
