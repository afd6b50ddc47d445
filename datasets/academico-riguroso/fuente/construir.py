#!/usr/bin/env python3
"""Construye train.jsonl y eval.jsonl de academico-riguroso a partir de los módulos de esta carpeta.

Uso: python3 datasets/academico-riguroso/fuente/construir.py
Determinista: el mismo código fuente produce siempre los mismos ficheros (sin dependencias externas).

Reparto: dentro de cada categoría, uno de cada seis elementos va a eval (índice % 6 == 5). Los pasajes
de comprensión se reparten por grupo (todas las preguntas de un pasaje van al mismo fichero), para que
eval no contenga pasajes vistos en entrenamiento. Después se barajan con semilla fija.
"""
import json
import os
import random
import sys

AQUI = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, AQUI)

import comprension  # noqa: E402
import factual  # noqa: E402
import json_estricto  # noqa: E402
import no_lo_se  # noqa: E402
import premisa_falsa  # noqa: E402

# Prompt de sistema opcional. Se añade a una fracción de los ejemplos (1 de cada 8, por posición tras
# barajar) para que el campo "system" del formato alpaca también se ejercite; el comportamiento
# esperado es el mismo con o sin él.
SISTEMA = (
    "Eres un asistente académico riguroso. Responde con precisión y concisión, señala los matices "
    "necesarios, cita solo lo que dice el texto proporcionado y, si la pregunta o su contexto no "
    "contienen la respuesta, di «No lo sé» y explica por qué. No inventes autores, obras ni datos."
)

# Lo que la suite de comportamiento de Afinar (`afinar eval --suite`) exige a cada categoría del split de
# eval: `answer` (los datos clave de la respuesta de referencia), `refuse` (declinar con «No lo sé»),
# `premise` (rechazar la premisa falsa), `json` (JSON válido con las claves de la referencia).
EXPECTATIVA = {
    "factual": "answer",
    "comprension": "answer",
    "no_lo_se": "refuse",
    "premisa_falsa": "premise",
    "json_estricto": "json",
}

DESTINO_EVAL = 5  # índice % 6 == 5 -> eval
SEMILLA = 20241


def es_eval(i):
    return i % 6 == DESTINO_EVAL


def registros():
    """Devuelve (split, categoria, ejemplo) para todos los ejemplos."""
    out = []
    for nombre, mod in (("factual", factual), ("no_lo_se", no_lo_se), ("premisa_falsa", premisa_falsa)):
        for i, (ins, inp, res) in enumerate(mod.ITEMS):
            out.append(("eval" if es_eval(i) else "train", nombre,
                        {"instruction": ins, "input": inp, "output": res}))
    for i, (ins, inp, obj) in enumerate(json_estricto.ITEMS):
        salida = json.dumps(obj, ensure_ascii=False)
        out.append(("eval" if es_eval(i) else "train", "json_estricto",
                    {"instruction": ins, "input": inp, "output": salida}))
    for g, (pasaje, preguntas) in enumerate(comprension.GRUPOS):
        split = "eval" if es_eval(g) else "train"
        for j, (preg, res, cat) in enumerate(preguntas):
            # Alterna dos presentaciones: pregunta en la instrucción y pasaje en input, o
            # instrucción genérica con pasaje y pregunta juntos en input.
            if (g + j) % 2 == 0:
                ej = {"instruction": preg, "input": pasaje.strip(), "output": res}
            else:
                ej = {"instruction": "Responde a la pregunta usando únicamente la información del texto.",
                      "input": "Texto: " + pasaje.strip() + "\n\nPregunta: " + preg, "output": res}
            out.append((split, cat, ej))
    return out


def main():
    regs = registros()
    base = os.path.dirname(AQUI)
    for split in ("train", "eval"):
        filas = [(c, e) for s, c, e in regs if s == split]
        random.Random(SEMILLA + (split == "eval")).shuffle(filas)
        with open(os.path.join(base, split + ".jsonl"), "w", encoding="utf-8") as f:
            for k, (c, ej) in enumerate(filas):
                if k % 8 == 3:
                    ej = {"system": SISTEMA, **ej}
                if split == "eval":
                    # El split de eval es también la suite de comportamiento: lleva su categoría y su
                    # expectativa (el formato alpaca ignora estos campos al entrenar o evaluar la pérdida).
                    ej = {**ej, "category": c, "expect": EXPECTATIVA[c]}
                f.write(json.dumps(ej, ensure_ascii=False) + "\n")
        # Categorías también en un fichero aparte (train no las lleva en el JSONL).
        with open(os.path.join(AQUI, "categorias_" + split + ".txt"), "w", encoding="utf-8") as f:
            for c, _ in filas:
                f.write(c + "\n")
        print(split, len(filas))


if __name__ == "__main__":
    main()
