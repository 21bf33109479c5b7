"""difflens.intervene"""
