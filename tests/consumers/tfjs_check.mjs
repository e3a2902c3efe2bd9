// Loads a TF.js Layers model written by audotics-trainer with real @tensorflow/tfjs (the platform's
// inference library) and compares its predictions, L2-normalised, with the trainer's embeddings.
//
//   node tfjs_check.mjs MODEL_DIR INPUTS.json
// MODEL_DIR holds model.json and its weight shard(s). INPUTS.json has `features` (one input) or
// `inputs`, by input name (every input but `features` is int32). Prints the max abs difference; exits 1 above
// the tolerance (1e-5), 2 on a load failure.
import { readFile } from "node:fs/promises";
import path from "node:path";
import * as tf from "@tensorflow/tfjs";

const TOLERANCE = 1e-5;
const [modelDir, inputsPath] = process.argv.slice(2);

// @tensorflow/tfjs (without tfjs-node) has no file:// loader; this handler reads the files and hands
// tf.loadLayersModel exactly what a browser fetch of model.json and its shards would.
const fileHandler = {
  async load() {
    const modelJson = JSON.parse(await readFile(path.join(modelDir, "model.json"), "utf8"));
    const weightSpecs = [];
    const buffers = [];
    for (const group of modelJson.weightsManifest) {
      weightSpecs.push(...group.weights);
      for (const p of group.paths) buffers.push(await readFile(path.join(modelDir, p)));
    }
    const all = Buffer.concat(buffers);
    const weightData = all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength);
    return { modelTopology: modelJson.modelTopology, format: modelJson.format, generatedBy: modelJson.generatedBy, weightSpecs, weightData };
  },
};

let model;
try {
  model = await tf.loadLayersModel(fileHandler);
} catch (e) {
  console.log(`tfjs ${tf.version.tfjs} failed to load ${modelDir}: ${e.message}`);
  process.exit(2);
}
const data = JSON.parse(await readFile(inputsPath, "utf8"));
const out = data.inputs
  ? model.predict(model.inputNames.map((name) => tf.tensor2d(data.inputs[name], undefined, name === "features" ? "float32" : "int32")))
  : model.predict(tf.tensor2d(data.features));
const normalised = tf.div(out, tf.maximum(tf.norm(out, "euclidean", 1, true), 1e-12));
const got = await normalised.array();
let diff = 0;
got.forEach((row, i) => row.forEach((v, j) => { diff = Math.max(diff, Math.abs(v - data.embeddings[i][j])); }));
console.log(JSON.stringify({ tfjs: tf.version.tfjs, backend: tf.getBackend(), rows: got.length, max_abs_diff: diff }));
process.exit(diff <= TOLERANCE ? 0 : 1);
