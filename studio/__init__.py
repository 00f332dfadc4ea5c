"""MoL Studio: the Gradio app over `mol`, its persistence (SQLAlchemy + SQLite) and its Plotly figures."""
