"""Instruction templates of the alignment tasks (METHOD.md section 3), in our own words.

Each task has a pool of templates; every example draws one at random (seeded). A template is
(variant, prompt, response): the variant names what goes in and comes out (for instance
"title" for title -> SID), the prompt is the user message with {fields}, and the response
names the field that is the assistant's answer.
Fields: {history} SIDs of past items, oldest first; {titles} their titles; {sid}, {title},
{description} of one item; {query} a preference or intent text; {preference} a user summary.
"""
from collections import namedtuple

Template = namedtuple("Template", "variant prompt response")

TEMPLATES = {
    "seqrec": [
        Template("sid", "Here is what the user interacted with, oldest first: {history}. Which item will the user pick next?", "sid"),
        Template("sid", "A customer's recent items, in order: {history}. Recommend the single item they are most likely to want next.", "sid"),
        Template("sid", "Purchase history (earliest to latest): {history}. Predict the next item.", "sid"),
        Template("sid", "Given this sequence of items a user engaged with: {history}, what comes next?", "sid"),
        Template("sid", "The user has gone through these items one after another: {history}. Suggest the next one.", "sid"),
        Template("sid", "Look at the order in which this shopper chose items: {history}. Name the item they will choose next.", "sid"),
        Template("sid", "Interaction log: {history}. Based on how the user's interests move, output the next item's identifier.", "sid"),
        Template("sid", "Past items, from first to most recent: {history}. Recommend one item for this user now.", "sid"),
        Template("sid", "Someone bought these in sequence: {history}. Which product should we show them next?", "sid"),
        Template("sid", "Consider the user's history {history}. Give the identifier of the item that best continues it.", "sid"),
        Template("sid", "These items reflect a user's taste over time: {history}. What will they buy next?", "sid"),
    ],
    "item2index": [
        Template("title", "Which item is titled \"{title}\"? Answer with its identifier.", "sid"),
        Template("title", "Give the identifier of the product called: {title}", "sid"),
        Template("title", "An item has the title {title} What is its item identifier?", "sid"),
        Template("title", "Map this product title to its identifier: {title}", "sid"),
        Template("description", "Here is a product description: {description} Which item does it describe?", "sid"),
        Template("description", "Find the item matching this description and return its identifier: {description}", "sid"),
        Template("description", "Description: {description} Output the identifier of this item.", "sid"),
        Template("both", "Title: {title} Description: {description} What is the identifier of this item?", "sid"),
        Template("both", "An item called {title} is described as follows: {description} Give its identifier.", "sid"),
        Template("both", "Identify the product from its title ({title}) and description ({description}).", "sid"),
        Template("both", "Which identifier belongs to the item \"{title}\", described as: {description}", "sid"),
    ],
    "index2item": [
        Template("title", "What is the title of item {sid}?", "title"),
        Template("title", "Tell me the name of the product with identifier {sid}.", "title"),
        Template("title", "Item {sid} is called what?", "title"),
        Template("title", "Give the title of the item whose identifier is {sid}.", "title"),
        Template("description", "Describe item {sid}.", "description"),
        Template("description", "What does the product {sid} look like? Give its description.", "description"),
        Template("description", "Write the description of item {sid}.", "description"),
        Template("both", "Give the title and a description of item {sid}.", "both"),
        Template("both", "Which product is {sid}? State its title, then describe it.", "both"),
        Template("both", "Tell me everything you know about item {sid}: its title and its description.", "both"),
    ],
    "fusionseqrec": [
        Template("sid2title", "The user went through these items in order: {history}. What is the title of the item they will want next?", "title"),
        Template("sid2title", "History: {history}. Name the next item the user will pick (give its title).", "title"),
        Template("sid2title", "Given the items {history}, predict the title of the user's next purchase.", "title"),
        Template("sid2title", "From this sequence of items, {history}, guess the title of what comes next.", "title"),
        Template("sid2description", "A user's items so far: {history}. Describe the item they will choose next.", "description"),
        Template("sid2description", "Based on the history {history}, write a description of the next item the user will like.", "description"),
        Template("sid2description", "Past items: {history}. What will the next item be like? Describe it.", "description"),
        Template("title2sid", "A user bought, in this order: {titles}. Give the identifier of the item they will buy next.", "sid"),
        Template("title2sid", "Items by title, oldest first: {titles}. Which item (identifier) comes next?", "sid"),
        Template("title2sid", "The customer's history by title is {titles}. Recommend the next item by its identifier.", "sid"),
        Template("title2sid", "Titles of the items a user engaged with: {titles}. Predict the next item's identifier.", "sid"),
    ],
    "itemsearch": [
        Template("history+query", "The user has interacted with {history}. They now say: \"{query}\" Which item fits best?", "sid"),
        Template("history+query", "History: {history}. Request: {query} Recommend one item.", "sid"),
        Template("history+query", "Given the user's past items {history} and what they are looking for ({query}), return the best item.", "sid"),
        Template("history+query", "A shopper with the history {history} searches for: {query} Give the identifier of the item to show.", "sid"),
        Template("history+query", "Keep the user's taste in mind ({history}) and find an item for this need: {query}", "sid"),
        Template("history+query", "Past items: {history}. The user adds: \"{query}\" What should we recommend?", "sid"),
        Template("query", "Find an item for this request: {query}", "sid"),
        Template("query", "A user asks: \"{query}\" Which item answers it? Give its identifier.", "sid"),
        Template("query", "Search query: {query} Return the most suitable item.", "sid"),
        Template("query", "Which product would you suggest to someone who says: {query}", "sid"),
        Template("query", "Recommend the item that best matches: {query}", "sid"),
    ],
    "preferenceobtain": [
        Template("preference", "A user interacted with these items: {history}. Summarise what they like.", "preference"),
        Template("preference", "From the history {history}, describe this user's preferences.", "preference"),
        Template("preference", "What kind of items does a person with this history prefer? {history}", "preference"),
        Template("preference", "Read the user's item history ({history}) and explain their tastes.", "preference"),
        Template("preference", "History: {history}. Write a short profile of the user's interests.", "preference"),
        Template("preference", "Infer the user's preferences from the items they chose: {history}.", "preference"),
        Template("preference", "Given {history}, what does this shopper care about?", "preference"),
        Template("preference", "Describe the taste of a user whose items were {history}.", "preference"),
        Template("preference", "Sum up the preferences behind this sequence of items: {history}.", "preference"),
        Template("preference", "Look at these past items, {history}, and state what the user tends to like.", "preference"),
    ],
}

SYSTEM_PROMPT = ("You are a recommender. Items are written as identifiers made of special tokens; "
                 "answer with exactly what is asked.")
