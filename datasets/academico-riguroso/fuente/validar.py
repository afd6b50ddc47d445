#!/usr/bin/env python3
"""Valida train.jsonl y eval.jsonl de academico-riguroso. Sale con código 1 si algo falla.

Uso: python3 datasets/academico-riguroso/fuente/validar.py
Comprueba: JSON válido por línea (UTF-8), solo las claves instruction/input/output/system, todas
strings, instrucción y salida no vacías; salidas de los ejemplos json_estricto parseables como un único
objeto o lista JSON; ejemplos no_lo_se que empiezan por «No lo sé»; sin pares (instruction, input)
repetidos dentro de un fichero ni entre train y eval; ningún pasaje de comprensión compartido entre
train y eval; mínimos de 320 (train) y 64 (eval). Imprime recuentos por categoría.
"""
import collections
import json
import os
import sys

AQUI = os.path.dirname(os.path.abspath(__file__))
BASE = os.path.dirname(AQUI)
MINIMOS = {"train": 320, "eval": 64}
CLAVES = {"instruction", "input", "output", "system"}
# El split de eval es también la suite de comportamiento: cada línea lleva su categoría y su expectativa.
CLAVES_SUITE = {"category", "expect"}
OBLIGATORIAS = {"instruction", "input", "output"}

errores = []


def error(msg):
    errores.append(msg)


def pasaje(inp):
    """Extrae el pasaje de un input de comprensión (con o sin el prefijo 'Texto: ... Pregunta:')."""
    if inp.startswith("Texto: ") and "\n\nPregunta: " in inp:
        return inp[len("Texto: "):inp.index("\n\nPregunta: ")]
    return inp


def cargar(split):
    ruta = os.path.join(BASE, split + ".jsonl")
    cats = open(os.path.join(AQUI, "categorias_" + split + ".txt"), encoding="utf-8").read().split()
    filas = []
    with open(ruta, "rb") as f:
        datos = f.read()
    try:
        texto = datos.decode("utf-8")
    except UnicodeDecodeError as e:
        error(f"{ruta}: no es UTF-8 válido ({e})")
        return []
    lineas = texto.split("\n")
    if lineas and lineas[-1] == "":
        lineas.pop()
    if len(lineas) != len(cats):
        error(f"{ruta}: {len(lineas)} líneas pero {len(cats)} categorías")
    for n, linea in enumerate(lineas, 1):
        donde = f"{split}.jsonl:{n}"
        try:
            ej = json.loads(linea)
        except json.JSONDecodeError as e:
            error(f"{donde}: JSON inválido: {e}")
            continue
        if not isinstance(ej, dict):
            error(f"{donde}: no es un objeto")
            continue
        permitidas = CLAVES | (CLAVES_SUITE if split == "eval" else set())
        if set(ej) - permitidas:
            error(f"{donde}: claves desconocidas {sorted(set(ej) - permitidas)}")
        if split == "eval":
            from construir import EXPECTATIVA
            c = cats[n - 1] if n - 1 < len(cats) else "?"
            if ej.get("category") != c or ej.get("expect") != EXPECTATIVA.get(c):
                error(f"{donde}: category/expect {ej.get('category')!r}/{ej.get('expect')!r} no casan con {c!r}")
        if OBLIGATORIAS - set(ej):
            error(f"{donde}: faltan claves {sorted(OBLIGATORIAS - set(ej))}")
            continue
        for k, v in ej.items():
            if not isinstance(v, str):
                error(f"{donde}: el campo {k} no es string")
        if not ej["instruction"].strip():
            error(f"{donde}: instrucción vacía")
        if not ej["output"].strip():
            error(f"{donde}: salida vacía")
        cat = cats[n - 1] if n - 1 < len(cats) else "?"
        if cat == "json_estricto":
            if "JSON" not in ej["instruction"]:
                error(f"{donde}: ejemplo estructurado sin 'JSON' en la instrucción")
            try:
                obj = json.loads(ej["output"])
                if not isinstance(obj, (dict, list)):
                    error(f"{donde}: la salida JSON no es objeto ni lista")
            except json.JSONDecodeError as e:
                error(f"{donde}: la salida estructurada no es JSON válido: {e}")
        if cat == "no_lo_se" and not ej["output"].startswith("No lo sé"):
            error(f"{donde}: ejemplo no_lo_se que no empieza por «No lo sé»")
        filas.append((cat, ej))
    return filas


def main():
    datos = {s: cargar(s) for s in ("train", "eval")}
    claves = {}
    for s, filas in datos.items():
        vistos = collections.Counter((e["instruction"], e["input"]) for _, e in filas)
        for par, c in vistos.items():
            if c > 1:
                error(f"{s}: par (instruction, input) repetido {c} veces: {par[0][:60]!r}")
        claves[s] = set(vistos)
        if len(filas) < MINIMOS[s]:
            error(f"{s}: {len(filas)} ejemplos, mínimo {MINIMOS[s]}")
    comunes = claves["train"] & claves["eval"]
    if comunes:
        error(f"{len(comunes)} pares (instruction, input) presentes en train y en eval")
    pas = {s: {pasaje(e["input"]) for c, e in datos[s] if c == "comprension" or (c == "no_lo_se" and len(e["input"]) > 150)}
           for s in datos}
    if pas["train"] & pas["eval"]:
        error(f"{len(pas['train'] & pas['eval'])} pasajes compartidos entre train y eval")
    salidas = {s: {e["output"] for _, e in datos[s]} for s in datos}
    for s, filas in datos.items():
        cats = collections.Counter(c for c, _ in filas)
        palabras = sorted(len((e["instruction"] + " " + e["input"] + " " + e["output"]).split()) for _, e in filas)
        con_sistema = sum("system" in e for _, e in filas)
        print(f"{s}: {len(filas)} ejemplos ({con_sistema} con system); palabras por ejemplo: "
              f"mediana {palabras[len(palabras) // 2]}, máx {palabras[-1]}; "
              f"{sum(p <= 200 for p in palabras)} de {len(palabras)} con ≤ 200 palabras")
        for c in ("factual", "comprension", "no_lo_se", "premisa_falsa", "json_estricto"):
            print(f"  {c:14s} {cats[c]:4d}  ({100 * cats[c] / len(filas):.1f} %)")
    print(f"salidas idénticas entre train y eval: {len(salidas['train'] & salidas['eval'])}")
    if errores:
        print(f"\n{len(errores)} ERRORES:")
        for e in errores[:50]:
            print("  " + e)
        sys.exit(1)
    print("OK: todas las comprobaciones han pasado")


if __name__ == "__main__":
    main()
