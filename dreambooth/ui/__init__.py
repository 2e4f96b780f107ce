"""The Dreambooth tab (gradio), built from the config's metadata; ``compat`` knows the gradio 3/4 differences.

Importing this package does not import gradio; ``tab.build_tab`` does, when the tab is built.
"""
