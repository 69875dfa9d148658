"""Model construction: the embedded tiny Llama and HF-folder loading helpers."""
