// OpenAI's Node client against the service: a system instruction and an image-only user turn, plain and
// streamed with include_usage. Prints one JSON line. Usage: node openai_node.cjs BASE_URL DATA_URL
const OpenAI = require("openai");

async function main() {
  const [baseURL, image] = process.argv.slice(2);
  const client = new OpenAI({ baseURL: `${baseURL}/v1`, apiKey: "unused" });
  const messages = [
    { role: "system", content: "Convert the document to markdown." },
    { role: "user", content: [{ type: "image_url", image_url: { url: image } }] },
  ];
  const plain = await client.chat.completions.create({ model: "deepseek-ocr", messages, max_tokens: 4 });
  const stream = await client.chat.completions.create({
    model: "deepseek-ocr", messages, max_tokens: 4, stream: true, stream_options: { include_usage: true },
  });
  let streamed = "";
  let usage = null;
  for await (const chunk of stream) {
    for (const choice of chunk.choices) streamed += choice.delta.content || "";
    if (chunk.usage) usage = chunk.usage;
  }
  const card = await client.models.retrieve("deepseek-ocr");
  console.log(JSON.stringify({ plain: plain.choices[0].message.content, streamed, usage, model: card.id }));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
