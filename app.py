"""Hugging Face Space entry point: the MoL Studio on the embedded demo models.

python app.py        # local: http://127.0.0.1:7860 (offline is fine)"""

from studio.app import build_app, configure_logging, launch_settings

configure_logging()
demo = build_app()

if __name__ == "__main__":
    demo.launch(**launch_settings())
