"""Inference-engine integrations: WQS behind LMCache and vLLM with a config entry, no patch.

* `wqs.integrations.lmcache` -- an LMCache remote storage plugin (``pip install
  wqs[lmcache]``): LMCache's remote backend dials ``plugin://wqs`` and stores its KV
  chunks in a WQS cluster.
* `wqs.integrations.vllm` -- a vLLM v1 KV connector (``pip install wqs[vllm]``):
  ``--kv-transfer-config '{"kv_connector": "WQSConnector", "kv_connector_module_path":
  "wqs.integrations.vllm", "kv_role": "kv_both", ...}'``.

Importing this package imports neither engine; each module imports its engine when it
is itself imported. Both share `wqs.integrations.common`: how an engine's config names
the cluster, and one client per cluster per process. See ``wqs/integrations/README.md``.
"""
