"""Adapters that put gream-fast's pieces inside other engines: trl.py (GRPOTrainer), verl.py
(advantage estimator, reward manager), vllm.py (trie logits processor). Import the one you need;
each imports its library itself, and `import gream_fast` imports none of them. core.py is the
library-free part they share."""
