"""MkDocs hook: the configuration reference is generated from the schema's own `doc` strings
(`ffn_dist.config.settings_reference`), so the documentation cannot drift from the code."""

MARKER = "<!-- settings reference -->"


def on_page_markdown(markdown, page, config, files):
    if MARKER not in markdown:
        return markdown
    from ffn_dist.config import settings_reference

    return markdown.replace(MARKER, settings_reference())
