"""moekit.hf"""
