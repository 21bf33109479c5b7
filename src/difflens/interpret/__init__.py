"""difflens.interpret"""
